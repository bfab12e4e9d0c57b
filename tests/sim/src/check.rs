//! Checkers, outside the nodes: they look only at what programs saw, at every node's PM and
//! at the live views the world gave the nodes. Safety: a read returns bytes some commit (not
//! refused) wrote, whole, and every commit acknowledged before it began (unless the page's
//! owner counted the reader down meanwhile, or the read failed over to other nodes' copies);
//! at the end an
//! acknowledged commit is present on every page it wrote (or overwritten by a later commit of
//! the same node), no commit is partly visible, every copy equals its owner's. Liveness: once
//! healed, the cluster settles (nothing locked, undecided or waiting) with every page at
//! `min(replicas, nodes)` copies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use hotpot_core::pm::PAGE_BYTES;
use hotpot_core::proto::types::{DatasetId, NodeId};

mod versions;
mod views;

use crate::workload::{slot_offset, stamp_of, ReadRecord, Status, Workload, SLOT_BYTES, STORING};
use crate::world::World;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub at_ms: u64,
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {} ms: {}", self.at_ms, self.what)
    }
}

/// The live views each node's machine was given (the dispatcher's answers), in time order.
#[derive(Default)]
pub struct Views {
    given: BTreeMap<NodeId, Vec<(u64, BTreeSet<NodeId>)>>,
}

impl Views {
    pub fn record(&mut self, node: NodeId, at_ms: u64, live: BTreeSet<NodeId>) {
        self.given.entry(node).or_default().push((at_ms, live));
    }

    /// Whether `node`'s view left `other` out at some time in `from_ms..=to_ms` (the view in
    /// force just before `from_ms` included: one given at `from_ms` may have come after).
    pub fn counted_down(&self, node: NodeId, other: NodeId, from_ms: u64, to_ms: u64) -> bool {
        let Some(given) = self.given.get(&node) else {
            return false;
        };
        let first = given
            .partition_point(|(at, _)| *at < from_ms)
            .saturating_sub(1);
        given[first..]
            .iter()
            .take_while(|(at, _)| *at <= to_ms)
            .any(|(_, live)| !live.contains(&other))
    }
}

#[derive(Default)]
pub struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    pub fn failed(&self) -> bool {
        !self.violations.is_empty()
    }

    pub fn take(&mut self) -> Vec<Violation> {
        std::mem::take(&mut self.violations)
    }

    pub fn violation(&mut self, at_ms: u64, what: String) {
        self.violations.push(Violation { at_ms, what });
    }

    /// A read returns whole committed slots, and (coherence) every commit acknowledged
    /// before the read started, unless the page's owner counted the reader down while that
    /// commit ran: a holder it counts down is left out and catches up later.
    pub fn check_read(
        &mut self,
        now_ms: u64,
        workload: &Workload,
        read: &ReadRecord,
        owners: &[NodeId],
        views: &Views,
    ) {
        let found = match stamps(workload, read.dataset, read.page, &read.bytes) {
            Ok(found) => found,
            Err(what) => {
                let what = format!(
                    "node {} read page {} of dataset {} (v{}): {what}",
                    read.node, read.page, read.dataset, read.version
                );
                return self.violation(now_ms, what);
            }
        };
        if read.failed_over {
            // The newest copy among the nodes that answered while the owner did not: no
            // promise beyond whole committed slots. The reader must fetch the page again
            // from its owner (the settle check waits for it), and reads after that are
            // checked in full.
            return;
        }
        for ((dataset, page, writer), stamps) in workload
            .acked
            .range((read.dataset, read.page, 0)..=(read.dataset, read.page, NodeId::MAX))
        {
            debug_assert_eq!((*dataset, *page), (read.dataset, read.page));
            let seen = found
                .iter()
                .find(|(node, _)| node == writer)
                .map_or(0, |(_, stamp)| *stamp);
            // Newest first; a commit the read shows vouches for every earlier one.
            for stamp in stamps.iter().rev() {
                let write = &workload.writes[stamp];
                if write.acked_ms.is_none_or(|acked| acked >= read.started_ms) {
                    continue;
                }
                if seen >= *stamp {
                    break;
                }
                let (from_ms, to_ms) = (write.started_ms, read.started_ms);
                if owners
                    .iter()
                    .any(|owner| views.counted_down(*owner, read.node, from_ms, to_ms))
                {
                    continue;
                }
                let what = format!(
                    "node {} read page {page} of dataset {dataset} (v{}) at {} ms without commit {stamp} of writer {writer}, acknowledged at {} ms (its slot holds {seen})",
                    read.node,
                    read.version,
                    read.started_ms,
                    write.acked_ms.unwrap_or_default()
                );
                return self.violation(now_ms, what);
            }
        }
    }

    /// The end of a seed: liveness first, then every page against the history.
    pub fn check_end(&mut self, now_ms: u64, quiescent: bool, world: &World) {
        if !quiescent {
            let mut what = String::from("the cluster did not settle after healing:");
            for (id, node) in &world.nodes {
                match &node.machine {
                    None => what.push_str(&format!(" n{id} down;")),
                    Some(machine) => what.push_str(&format!(
                        " n{id} rejoined {} (locks, calls) {:?} undecided {} replicated {} failed over {};",
                        machine.is_rejoined(),
                        machine.in_flight(),
                        machine.table().pending().len(),
                        machine.fully_replicated(),
                        machine.failed_over_pages(),
                    )),
                }
            }
            if !world.workload().idle() {
                what.push_str(" programs still waiting");
            }
            self.violation(now_ms, what);
            return;
        }
        let workload = world.workload();
        for (dataset, pages) in world.live_datasets() {
            let nodes = world.nodes.len();
            let wanted = usize::from(dataset.params.replicas.max(1)).min(nodes);
            for page in 0..*pages {
                let key = (dataset.id, page);
                let owner = world.owner_of(dataset, page);
                let table = |node: NodeId| {
                    world.nodes[&node]
                        .machine
                        .as_ref()
                        .expect("every node is up at the end")
                        .table()
                };
                let (version, bytes) = table(owner)
                    .read_persisted(key)
                    .unwrap_or((0, vec![0u8; PAGE_BYTES]));
                let mut copies = 0;
                let mut on = Vec::new();
                for node in world.nodes.keys() {
                    match table(*node).read_persisted(key) {
                        Some((v, b)) if v == version && b == bytes => {
                            copies += 1;
                            on.push(*node);
                        }
                        Some((v, _)) => self.violation(
                            now_ms,
                            format!(
                                "page {page} of dataset {}: node {node}'s copy (v{v}) differs from owner {owner}'s (v{version})",
                                dataset.id
                            ),
                        ),
                        None => {}
                    }
                }
                if version > 0 && copies < wanted {
                    self.violation(
                        now_ms,
                        format!(
                            "page {page} of dataset {}: {copies} copies of v{version} (on {on:?}; owner {owner} counts {:?} besides itself), the dataset wants {wanted}",
                            dataset.id,
                            world.nodes[&owner].machine.as_ref().map(|machine| machine.current_copies(key)),
                        ),
                    );
                }
                match stamps(workload, dataset.id, page, &bytes) {
                    Err(what) => self.violation(
                        now_ms,
                        format!("page {page} of dataset {} at its owner: {what}", dataset.id),
                    ),
                    Ok(found) => self.check_history(now_ms, world, dataset.id, page, &found),
                }
            }
        }
    }

    /// `found[n]`: the stamp in node n's slot of this page at its owner.
    fn check_history(
        &mut self,
        now_ms: u64,
        world: &World,
        dataset: DatasetId,
        page: u64,
        found: &[(NodeId, u64)],
    ) {
        let workload = world.workload();
        for (stamp, write) in &workload.writes {
            if write.dataset != dataset || !write.pages.contains(&page) {
                continue;
            }
            let seen = found
                .iter()
                .find(|(writer, _)| *writer == write.writer)
                .map_or(0, |(_, stamp)| *stamp);
            if write.status == Status::Acked && seen < *stamp {
                self.violation(
                    now_ms,
                    format!(
                        "acknowledged commit {stamp} of writer {} lost: page {page} of dataset {dataset} holds its commit {seen}",
                        write.writer
                    ),
                );
            }
        }
        // The commit whose stamp a slot holds is visible on all its pages.
        for (node, stamp) in found.iter().filter(|(_, stamp)| *stamp != 0) {
            let Some(write) = workload.writes.get(stamp) else {
                continue;
            };
            for other in write.pages.iter().filter(|other| **other != page) {
                let record = world.record(dataset);
                let Some((_, bytes)) = world.nodes[&world.owner_of(record, *other)]
                    .machine
                    .as_ref()
                    .and_then(|machine| machine.table().read_persisted((dataset, *other)))
                else {
                    self.violation(
                        now_ms,
                        format!("commit {stamp} of node {node} is on page {page} but page {other} was never written"),
                    );
                    continue;
                };
                let there = slot_stamp(&bytes, *node);
                if there < *stamp {
                    self.violation(
                        now_ms,
                        format!(
                            "commit {stamp} of writer {node} partly visible: on page {page}, page {other} has its commit {there}"
                        ),
                    );
                }
            }
        }
    }
}

fn slot_stamp(bytes: &[u8], writer: NodeId) -> u64 {
    let start = slot_offset(writer);
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[start..start + 8]);
    stamp_of(u64::from_le_bytes(word))
}

/// Each slot's stamp, after checking the page is whole: every slot eight equal words of a
/// commit (not refused) of that slot's writer that wrote this page, nothing outside slots.
fn stamps(
    workload: &Workload,
    dataset: DatasetId,
    page: u64,
    bytes: &[u8],
) -> Result<Vec<(NodeId, u64)>, String> {
    if bytes.len() != PAGE_BYTES {
        return Err(format!("{} bytes, not a page", bytes.len()));
    }
    let slots_end = slot_offset(2 * STORING);
    if bytes[..slot_offset(1)]
        .iter()
        .chain(&bytes[slots_end..])
        .any(|b| *b != 0)
    {
        return Err("bytes outside every slot are not zero".into());
    }
    let mut found = Vec::new();
    for node in 1..2 * STORING {
        let start = slot_offset(node);
        let slot = &bytes[start..start + SLOT_BYTES];
        let stamp = slot_stamp(bytes, node);
        if slot.chunks(8).any(|word| word != &slot[..8]) {
            return Err(format!("writer {node}'s slot is torn"));
        }
        if stamp == 0 {
            continue;
        }
        match workload.writes.get(&stamp) {
            Some(write)
                if write.writer == node
                    && write.dataset == dataset
                    && write.pages.contains(&page) =>
            {
                if write.status == Status::Refused {
                    return Err(format!("writer {node}'s slot holds refused commit {stamp}"));
                }
            }
            _ => {
                return Err(format!(
                    "writer {node}'s slot holds {stamp}, which no commit of it wrote here"
                ))
            }
        }
        found.push((node, stamp));
    }
    Ok(found)
}
