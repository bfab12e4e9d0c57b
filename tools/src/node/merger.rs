//! The node's identical-page merger thread (docs/design.md, "Identical-page merging"): steps
//! of the core `Merger` under the table lock, paced to `--merge-pages-per-s`, a pause after
//! each full round; the sharing numbers are counted at each round's end.
//! Must survive: PM errors (logged, retried a second later; a merge is all or nothing).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hotpot_core::page::{Merger, PageTable, Sharing};
use hotpot_core::pm::PAGE_BYTES;
use hotpot_core::proto::types::SharingCounts;

pub const DEFAULT_PAGES_PER_S: u64 = 20_000;
/// Pages hashed per hold of the table lock.
const STEP_PAGES: usize = 256;
/// Rest between two rounds over every page.
const ROUND_PAUSE: Duration = Duration::from_secs(1);

/// What `hotpot status` shows of the merger.
#[derive(Default)]
pub struct MergeCounters {
    frames_shared: AtomicU64,
    frames_saved: AtomicU64,
    pages_scanned: AtomicU64,
    pages_merged: AtomicU64,
}

impl MergeCounters {
    /// The merger's totals, and the sharing counted at a round's end.
    fn record(&self, merger: &Merger, sharing: Option<Sharing>) {
        self.pages_scanned
            .store(merger.pages_scanned, Ordering::Relaxed);
        self.pages_merged
            .store(merger.pages_merged, Ordering::Relaxed);
        if let Some(sharing) = sharing {
            self.frames_shared
                .store(sharing.frames_shared, Ordering::Relaxed);
            self.frames_saved
                .store(sharing.frames_saved, Ordering::Relaxed);
        }
    }

    pub fn counts(&self) -> SharingCounts {
        SharingCounts {
            frames_shared: self.frames_shared.load(Ordering::Relaxed),
            bytes_saved: self.frames_saved.load(Ordering::Relaxed) * PAGE_BYTES as u64,
            pages_scanned: self.pages_scanned.load(Ordering::Relaxed),
            pages_merged: self.pages_merged.load(Ordering::Relaxed),
        }
    }
}

/// The merger's loop; `with_table` runs a step with the node's page table, between two of
/// the protocol's uses of it.
pub fn run(
    counters: &MergeCounters,
    pages_per_s: u64,
    with_table: impl Fn(&mut dyn FnMut(&mut PageTable)),
) {
    if pages_per_s == 0 {
        tracing::info!("identical-page merging is off");
        return;
    }
    let mut merger = Merger::default();
    loop {
        let started = Instant::now();
        let mut stepped = Ok(0);
        with_table(&mut |table| {
            stepped = merger.step(table, STEP_PAGES);
            let sharing = merger.round_done().then(|| table.sharing());
            counters.record(&merger, sharing);
        });
        match stepped {
            Ok(visited) => {
                let budget = Duration::from_secs_f64(visited as f64 / pages_per_s as f64);
                std::thread::sleep(budget.saturating_sub(started.elapsed()));
                if merger.round_done() {
                    std::thread::sleep(ROUND_PAUSE);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "identical-page merge failed; retrying");
                std::thread::sleep(ROUND_PAUSE);
            }
        }
    }
}
