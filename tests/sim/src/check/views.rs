//! Views, as programs saw them: a page read at a view's version `v` shows, in each node's
//! slot, every acknowledged commit of that node to the page with a version at or below `v`
//! (the newest of them, or a later commit not acknowledged), and no acknowledged commit
//! above `v`. Checked at the end: a commit acknowledged after the read, at a version at or
//! below the view's, must be in it too (the view is the dataset as it was at `v`).

use super::{stamps, Checker};
use crate::workload::{Status, Workload, WriteRecord};

impl Checker {
    pub fn check_views(&mut self, now_ms: u64, workload: &Workload) {
        for read in &workload.view_reads {
            let here = format!(
                "node {} read page {} of dataset {} at version {} (at {} ms)",
                read.node, read.page, read.dataset, read.version, read.started_ms
            );
            let found = match stamps(workload, read.dataset, read.page, &read.bytes) {
                Ok(found) => found,
                Err(what) => {
                    self.violation(now_ms, format!("{here}: {what}"));
                    continue;
                }
            };
            for ((_, _, writer), acked) in workload
                .acked
                .range((read.dataset, read.page, 0)..=(read.dataset, read.page, u32::MAX))
            {
                let seen = found
                    .iter()
                    .find(|(node, _)| node == writer)
                    .map_or(0, |(_, stamp)| *stamp);
                let shown = workload.writes.get(&seen);
                // A store may be in a version below the one its acknowledgement named.
                let versioned =
                    |write: &&WriteRecord| write.status == Status::Acked && !write.is_store();
                if let Some(write) = shown.filter(versioned) {
                    if write.dataset_version > read.version {
                        let what = format!(
                            "{here}: it shows commit {seen} of writer {writer}, acknowledged as version {}",
                            write.dataset_version
                        );
                        self.violation(now_ms, what);
                        continue;
                    }
                }
                // The newest acknowledged commit of this node at or below the view's version
                // (a node's commits are one at a time: a later one has a higher version).
                let due = acked.iter().rev().find(|stamp| {
                    let version = workload.writes[stamp].dataset_version;
                    version != 0 && version <= read.version
                });
                if let Some(due) = due.filter(|due| seen < **due) {
                    let write = &workload.writes[due];
                    let what = format!(
                        "{here}: writer {writer}'s slot holds {seen}, without commit {due}, acknowledged at {} ms as version {}",
                        write.acked_ms.unwrap_or_default(),
                        write.dataset_version
                    );
                    self.violation(now_ms, what);
                }
            }
        }
    }
}
