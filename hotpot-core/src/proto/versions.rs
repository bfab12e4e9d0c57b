//! The dataset versions one node hands out (docs/design.md, "Dataset versions"), as an MRMW
//! dataset's home or an MRSW dataset's writer: numbers from blocks the dispatcher grants
//! (each above every block granted before), a spare block taken ahead so commits rarely wait.
//! Sans-IO, shared by the daemon and the node machine: asked for a version it has no number
//! for, it says so (`Give::NeedBlock`), and the caller takes a block from the dispatcher and
//! hands it in (`add_block`). Must survive: a used-up block asked for the latest version (the
//! last one given, never a failure), a home that restarts or changes (volatile: a new start
//! takes a new block, never reuses a number), a block that arrives twice or late.

use std::collections::BTreeMap;

use crate::proto::types::{Dataset, DatasetId, Mode, NodeId};

/// What the sequencer can answer now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Give {
    Version(u64),
    /// No number left (or none yet): take a block from the dispatcher, `add_block` it, ask
    /// again.
    NeedBlock,
}

/// The versions of one dataset still to give out: `next..end`, then the spare block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Blocks {
    next: u64,
    end: u64,
    spare: Option<u64>,
    /// An MRSW writer's commit under way: the version given to it (`committing`), until it
    /// ended (`commit_ended`).
    committing: Option<u64>,
}

impl Blocks {
    fn starting_at(start: u64, size: u64) -> Blocks {
        Blocks {
            next: start,
            end: start + size,
            spare: None,
            committing: None,
        }
    }
}

#[derive(Debug)]
pub struct Sequencer {
    /// How many versions a block holds (the dispatcher's block size).
    block: u64,
    /// Per dataset this node gives versions of: its blocks.
    blocks: BTreeMap<DatasetId, Blocks>,
}

impl Sequencer {
    pub fn new(block: u64) -> Sequencer {
        assert!(block > 0, "a version block holds at least one version");
        Sequencer {
            block,
            blocks: BTreeMap::new(),
        }
    }

    /// The next version of `dataset` (`take`), or the latest (0 before the first): the
    /// newest given out, but below an MRSW writer's commit still under way, which its
    /// owners may not have (`committing`). By `me` (this node and its incarnation). The
    /// incarnation that created an MRMW dataset as its home owns the first block (the
    /// dispatcher starts its blocks after it).
    pub fn give(&mut self, dataset: &Dataset, me: (NodeId, u64), take: bool) -> Give {
        let size = self.block;
        let blocks = match self.blocks.get_mut(&dataset.id) {
            Some(blocks) => blocks,
            None if dataset.params.mode == Mode::Mrmw && dataset.first_home == Some(me) => self
                .blocks
                .entry(dataset.id)
                .or_insert(Blocks::starting_at(1, size)),
            None => return Give::NeedBlock,
        };
        if !take {
            // A used-up block still knows the latest.
            let latest = blocks.next - 1;
            return Give::Version(blocks.committing.map_or(latest, |v| latest.min(v - 1)));
        }
        if blocks.next == blocks.end {
            match blocks.spare {
                Some(start) => *blocks = Blocks::starting_at(start, size),
                None => return Give::NeedBlock,
            }
        }
        blocks.next += 1;
        Give::Version(blocks.next - 1)
    }

    /// An MRSW writer's next version, for the commit it sends now (`give` and `committing`
    /// in one step: no latest answered in between names it).
    pub fn give_to_commit(&mut self, dataset: &Dataset, me: (NodeId, u64)) -> Give {
        let given = self.give(dataset, me, true);
        if let Give::Version(version) = given {
            self.committing(dataset.id, version);
        }
        given
    }

    /// An MRSW writer gave `version` to a commit it sends now: until the commit ended, the
    /// latest is below it. An MRMW home needs no such mark: it gives a version only once
    /// every page of the commit is locked at its owners, and a read at a version waits for
    /// the pages' locks (found by hotpot-sim: a view at the writer's latest missed the
    /// commit that had just taken it, still on its way to the owner).
    pub fn committing(&mut self, dataset: DatasetId, version: u64) {
        if let Some(blocks) = self.blocks.get_mut(&dataset) {
            blocks.committing = Some(version);
        }
    }

    /// The writer's commit ended (acknowledged, refused, or in doubt): the latest is its
    /// version again.
    pub fn commit_ended(&mut self, dataset: DatasetId) {
        if let Some(blocks) = self.blocks.get_mut(&dataset) {
            blocks.committing = None;
        }
    }

    /// A block the dispatcher granted for `dataset`: the first, or the spare. A block that
    /// finds a spare already there is not needed (its numbers are never given: versions
    /// skip, they never repeat).
    pub fn add_block(&mut self, dataset: DatasetId, start: u64) {
        let size = self.block;
        match self.blocks.get_mut(&dataset) {
            None => {
                self.blocks
                    .insert(dataset, Blocks::starting_at(start, size));
            }
            Some(blocks) => {
                if blocks.spare.is_none() && start >= blocks.end {
                    blocks.spare = Some(start);
                }
            }
        }
    }

    /// Whether `me` has no version of `dataset` to give: no block, and not the first home's
    /// first block. A home takes one at its start, so its first commits need no dispatcher.
    pub fn needs_block(&self, dataset: &Dataset, me: (NodeId, u64)) -> bool {
        let first_home = dataset.params.mode == Mode::Mrmw && dataset.first_home == Some(me);
        !self.blocks.contains_key(&dataset.id) && !first_home
    }

    /// Whether this node gives out `dataset`'s versions now.
    pub fn has(&self, dataset: DatasetId) -> bool {
        self.blocks.contains_key(&dataset)
    }

    /// This node no longer gives `dataset`'s versions (an MRSW lease given back).
    pub fn drop_dataset(&mut self, dataset: DatasetId) {
        self.blocks.remove(&dataset);
    }

    /// Datasets whose block is more than half given out with no spare yet: take one ahead.
    pub fn running_low(&self) -> Vec<DatasetId> {
        self.blocks
            .iter()
            .filter(|(_, blocks)| {
                blocks.spare.is_none() && blocks.end - blocks.next <= self.block / 2
            })
            .map(|(dataset, _)| *dataset)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{Give, Sequencer};
    use crate::proto::types::{Dataset, DatasetParams, Mode};

    fn dataset(first_home: Option<(u32, u64)>) -> Dataset {
        Dataset {
            id: 1,
            params: DatasetParams {
                mode: Mode::Mrmw,
                replicas: 2,
                chunk_pages: 4,
            },
            owners: vec![1, 2],
            first_home,
        }
    }

    /// Takes `n` versions, adding the block the dispatcher would grant whenever one is asked.
    fn take(sequencer: &mut Sequencer, dataset: &Dataset, blocks: &mut u64, n: usize) -> Vec<u64> {
        let mut given = Vec::new();
        while given.len() < n {
            match sequencer.give(dataset, (1, 1), true) {
                Give::Version(version) => given.push(version),
                Give::NeedBlock => {
                    sequencer.add_block(dataset.id, *blocks);
                    *blocks += 4;
                }
            }
        }
        given
    }

    #[test]
    fn a_used_up_block_answers_the_latest_and_the_next_takes_a_new_block() {
        let dataset = dataset(None);
        let mut sequencer = Sequencer::new(4);
        assert_eq!(sequencer.give(&dataset, (1, 1), false), Give::NeedBlock);
        let mut blocks = 5;
        assert_eq!(take(&mut sequencer, &dataset, &mut blocks, 4), [5, 6, 7, 8]);
        // Used up: the latest is still known (a panic here once stopped a home node).
        assert_eq!(sequencer.give(&dataset, (1, 1), false), Give::Version(8));
        assert_eq!(sequencer.give(&dataset, (1, 1), true), Give::NeedBlock);
        assert_eq!(take(&mut sequencer, &dataset, &mut blocks, 2), [9, 10]);
    }

    #[test]
    fn the_latest_stays_below_a_writers_commit_until_it_ended() {
        let dataset = dataset(None);
        let mut sequencer = Sequencer::new(4);
        sequencer.add_block(1, 5);
        assert_eq!(take(&mut sequencer, &dataset, &mut 100, 2), [5, 6]);
        sequencer.committing(1, 6);
        assert_eq!(sequencer.give(&dataset, (1, 1), false), Give::Version(5));
        sequencer.commit_ended(1);
        assert_eq!(sequencer.give(&dataset, (1, 1), false), Give::Version(6));
        // A first commit under way: nothing is the latest yet but what came before.
        let mut fresh = Sequencer::new(4);
        fresh.add_block(1, 9);
        assert_eq!(take(&mut fresh, &dataset, &mut 100, 1), [9]);
        fresh.committing(1, 9);
        assert_eq!(fresh.give(&dataset, (1, 1), false), Give::Version(8));
    }

    #[test]
    fn the_spare_block_is_used_once_the_current_one_is_out() {
        let dataset = dataset(None);
        let mut sequencer = Sequencer::new(4);
        sequencer.add_block(1, 5);
        assert!(sequencer.running_low().is_empty());
        assert_eq!(take(&mut sequencer, &dataset, &mut 100, 2), [5, 6]);
        assert_eq!(sequencer.running_low(), [1]);
        sequencer.add_block(1, 13);
        // A second block while a spare waits is not needed: its numbers are skipped.
        sequencer.add_block(1, 17);
        assert!(sequencer.running_low().is_empty());
        assert_eq!(take(&mut sequencer, &dataset, &mut 100, 4), [7, 8, 13, 14]);
    }

    #[test]
    fn only_the_creating_incarnation_of_the_first_home_owns_the_first_block() {
        let dataset = dataset(Some((1, 1)));
        let mut first = Sequencer::new(4);
        assert_eq!(first.give(&dataset, (1, 1), false), Give::Version(0));
        assert_eq!(first.give(&dataset, (1, 1), true), Give::Version(1));
        assert!(!Sequencer::new(4).needs_block(&dataset, (1, 1)));
        // The same node started again, or another node, asks the dispatcher.
        let mut restarted = Sequencer::new(4);
        assert!(restarted.needs_block(&dataset, (1, 2)));
        assert_eq!(restarted.give(&dataset, (1, 2), true), Give::NeedBlock);
        assert_eq!(restarted.give(&dataset, (2, 1), true), Give::NeedBlock);
        restarted.add_block(1, 9);
        assert!(!restarted.needs_block(&dataset, (1, 2)));
    }

    #[test]
    fn a_block_below_the_current_one_never_becomes_the_spare() {
        let dataset = dataset(None);
        let mut sequencer = Sequencer::new(4);
        sequencer.add_block(1, 9);
        // A late answer to an earlier request, for a lower block.
        sequencer.add_block(1, 5);
        assert_eq!(
            take(&mut sequencer, &dataset, &mut 13, 6),
            [9, 10, 11, 12, 13, 14]
        );
    }
}
