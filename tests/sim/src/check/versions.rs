//! Dataset versions, as programs saw them: every acknowledged commit names a version (an
//! MRMW one its home's, an MRSW one its writer's), no two acknowledged commits of a dataset name the same one, and a commit that began after
//! another was acknowledged names a higher one (versions order commits in real time, across
//! homes that restart or are replaced). A `Latest` answer (`hotpot stat`) is at least every
//! version acknowledged before it was asked, and below every version taken by a commit that
//! began after it was answered.

use std::collections::BTreeMap;

use hotpot_core::proto::types::DatasetId;

use super::Checker;
use crate::workload::{Status, Workload};

impl Checker {
    pub fn check_versions(&mut self, now_ms: u64, workload: &Workload) {
        // Per dataset: (acked at, started at, version, stamp) of each acknowledged commit.
        let mut acked: BTreeMap<DatasetId, Vec<(u64, u64, u64, u64)>> = BTreeMap::new();
        for (stamp, write) in &workload.writes {
            // A store takes the version of the commit that took it: not a version of its own.
            if write.status != Status::Acked || write.is_store() {
                continue;
            }
            let acked_ms = write.acked_ms.expect("an acknowledged commit has its time");
            if write.dataset_version == 0 {
                let what = format!(
                    "commit {stamp} of node {} to dataset {} was acknowledged with no dataset version",
                    write.node, write.dataset
                );
                self.violation(now_ms, what);
                continue;
            }
            acked.entry(write.dataset).or_default().push((
                acked_ms,
                write.started_ms,
                write.dataset_version,
                *stamp,
            ));
        }
        for latest in &workload.latests {
            let Some(commits) = acked.get(&latest.dataset) else {
                continue;
            };
            for (acked_ms, started_ms, version, stamp) in commits {
                let what = if *acked_ms < latest.started_ms && *version > latest.version {
                    "acknowledged before it was asked"
                } else if *started_ms > latest.answered_ms && *version <= latest.version {
                    "begun after it was answered"
                } else {
                    continue;
                };
                let what = format!(
                    "node {} asked at {} ms for the latest version of dataset {} and got {}, but commit {stamp}, {what}, took version {version}",
                    latest.node, latest.started_ms, latest.dataset, latest.version
                );
                self.violation(now_ms, what);
            }
        }
        for (dataset, mut commits) in acked {
            let mut by_version: BTreeMap<u64, u64> = BTreeMap::new();
            for (_, _, version, stamp) in &commits {
                if let Some(other) = by_version.insert(*version, *stamp) {
                    let what = format!(
                        "commits {other} and {stamp} of dataset {dataset} were both acknowledged as version {version}"
                    );
                    self.violation(now_ms, what);
                }
            }
            // In acknowledgement order: the highest version acknowledged so far, which every
            // commit started after that acknowledgement must exceed.
            commits.sort();
            let mut highest: Vec<(u64, u64, u64)> = Vec::with_capacity(commits.len());
            for (acked_ms, _, version, stamp) in &commits {
                let best = match highest.last() {
                    Some((_, top, top_stamp)) if top >= version => (*acked_ms, *top, *top_stamp),
                    _ => (*acked_ms, *version, *stamp),
                };
                highest.push(best);
            }
            for (_, started_ms, version, stamp) in &commits {
                let before = highest.partition_point(|(acked_ms, _, _)| acked_ms < started_ms);
                if before == 0 {
                    continue;
                }
                let (acked_ms, top, top_stamp) = highest[before - 1];
                if top >= *version {
                    let what = format!(
                        "commit {stamp} of dataset {dataset} began at {started_ms} ms and took version {version}, but commit {top_stamp} was acknowledged at {acked_ms} ms with version {top}"
                    );
                    self.violation(now_ms, what);
                }
            }
        }
    }
}
