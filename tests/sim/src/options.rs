//! A seed's options (swarm testing: each seed turns every fault on or off and picks its
//! rates, so one run covers many mixes). Everything here comes from the seed alone.

use std::fmt;

use hotpot_core::proto::node::Bugs;
use hotpot_core::proto::types::Mode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One dataset of the simulated cluster.
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    pub mode: Mode,
    pub replicas: u8,
    pub pages: u64,
    pub chunk_pages: u32,
}

/// A dataset a program makes while the cluster runs, at `at_ms` of the workload, and
/// deletes (unlinks its one name) `deleted_after_ms` later if that is set: the programs stop
/// using it, and a node that starts after it drops its pages, as a daemon drops the pages of
/// datasets the dispatcher no longer lists.
#[derive(Clone, Debug)]
pub struct Made {
    pub at_ms: u64,
    pub dataset: DatasetOptions,
    pub deleted_after_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub nodes: u32,
    pub datasets: Vec<DatasetOptions>,
    /// Datasets a program makes while the cluster runs (`create` through the dispatcher,
    /// which picks their owners among the nodes it counts live): the nodes learn them when
    /// something names them.
    pub created: Vec<Made>,
    /// A node (`nodes + 1`) joins the running cluster at this time of the workload: it owns
    /// none of the datasets made before it joined, and holds copies and replicas as any.
    pub late_join_ms: Option<u64>,
    /// Per message, in thousandths.
    pub loss_per_mille: u32,
    pub duplicate_per_mille: u32,
    /// Delivery delay bounds: a wide range reorders messages.
    pub delay_ms: (u64, u64),
    pub partitions: bool,
    /// Partitions may cut one direction only.
    pub one_way: bool,
    /// Partitions may cut nodes off from the dispatcher (which then counts them down while
    /// their peers still reach them).
    pub dispatcher_cut: bool,
    /// Crashes and partitions may last up to 6 s, past the dispatcher's 3 s node timeout.
    pub long_outages: bool,
    pub crashes: bool,
    /// A crash also writes back some unpersisted cache lines (torn writes).
    pub torn_writes: bool,
    /// A crash may cut power in the middle of a step's persists.
    pub crash_mid_step: bool,
    /// A crashed node may come back with its PM wiped (within the replication degree).
    pub wipes: bool,
    /// The dispatcher crashes and restarts on what it persisted.
    pub dispatcher_crashes: bool,
    /// The dispatcher promotes a successor in place of a node silent this long (0: never).
    /// Only with every dataset replicated and crash-stop silence: partitions then never cut
    /// the dispatcher off and its messages are never lost, so only a crashed node stays
    /// silent that long (and a crashed node stays down up to 8 s) (promotion assumes it is dead; docs/design.md, "Owner promotion").
    pub promote_after_ms: u64,
    /// Dataset versions per block the dispatcher grants (small, so homes run out of
    /// versions and take new blocks within a seed).
    pub version_block: u64,
    /// Virtual milliseconds of workload (faults only in this phase).
    pub workload_ms: u64,
    /// Pause between a client's operations, bounds in ms.
    pub think_ms: (u64, u64),
    /// Each node runs the identical-page merger (the daemon's, on by default there).
    pub merging: bool,
    /// Nodes read pages from their owners one-sided (`Locate`, then remote reads of the
    /// owner's live PM), as the daemon does over verbs.
    pub one_sided: bool,
    /// Each node's program has a storing thread (workload.rs) beside its committing one.
    pub storers: bool,
    /// The storing threads also store with write(2) (`Op::Write` without msync: a partial
    /// page past the kernel's cache, staged by the file system for the next commit).
    pub write_calls: bool,
    pub bugs: Bugs,
}

impl Options {
    /// The options of `seed`, drawn with the seed's own generator (so they never depend on
    /// anything else the run does).
    pub fn from_seed(seed: u64, rng: &mut ChaCha8Rng, bugs: Bugs) -> Options {
        let nodes = rng.random_range(3..=7);
        let dataset_count = rng.random_range(1..=3);
        let datasets = (0..dataset_count)
            .map(|_| DatasetOptions {
                mode: if rng.random_bool(0.5) {
                    Mode::Mrmw
                } else {
                    Mode::Mrsw
                },
                replicas: rng.random_range(1..=3),
                pages: rng.random_range(2..=12),
                chunk_pages: rng.random_range(1..=4),
            })
            .collect();
        let mut on = |chance: f64| rng.random_bool(chance);
        let (loss, dup, wide, partitions, one_way, crashes, torn, mid, wipes, dispatcher) = (
            on(0.5),
            on(0.4),
            on(0.4),
            on(0.5),
            on(0.4),
            on(0.5),
            on(0.5),
            on(0.5),
            on(0.5),
            on(0.4),
        );
        Options {
            seed,
            nodes,
            datasets,
            created: Vec::new(),
            late_join_ms: None,
            loss_per_mille: if loss { rng.random_range(1..=80) } else { 0 },
            duplicate_per_mille: if dup { rng.random_range(1..=50) } else { 0 },
            delay_ms: if wide {
                (0, rng.random_range(5..=200))
            } else {
                (0, 2)
            },
            partitions,
            one_way: partitions && one_way,
            crashes,
            torn_writes: crashes && torn,
            crash_mid_step: crashes && mid,
            wipes: crashes && wipes,
            dispatcher_crashes: dispatcher,
            dispatcher_cut: partitions && rng.random_bool(0.5),
            long_outages: (partitions || crashes) && rng.random_bool(0.5),
            workload_ms: rng.random_range(2_000..=8_000),
            think_ms: (0, rng.random_range(1..=40)),
            promote_after_ms: 0,
            version_block: 0,
            merging: false,
            one_sided: false,
            storers: false,
            write_calls: false,
            bugs,
        }
        .with_promotion(rng)
        .with_version_block(rng)
        .with_merging(rng)
        .with_one_sided()
        .with_storers()
        .with_created()
        .with_late_join()
        .with_write_calls()
    }

    /// From the seed's sixth stream, as `with_one_sided`: a seed whose storing threads do
    /// not write with write(2) runs the world it ran before.
    fn with_write_calls(mut self) -> Options {
        let mut sixth = self.stream(5);
        self.write_calls = self.storers && sixth.random_bool(0.5);
        self
    }

    /// From the seed's fifth stream, as `with_one_sided`: a seed without a node joining
    /// late runs the world it ran before.
    fn with_late_join(mut self) -> Options {
        let mut fifth = self.stream(4);
        if fifth.random_bool(0.5) {
            self.late_join_ms = Some(fifth.random_range(0..self.workload_ms / 2));
        }
        self
    }

    /// From the seed's fourth stream, as `with_one_sided`: a seed without datasets made
    /// while it runs runs the world it ran before they came. With promotion they are
    /// replicated, as the others are.
    fn with_created(mut self) -> Options {
        let mut fourth = self.stream(3);
        if fourth.random_bool(0.5) {
            let least_replicas = if self.promote_after_ms > 0 { 2 } else { 1 };
            let count = fourth.random_range(1..=2);
            self.created = (0..count)
                .map(|_| {
                    let at_ms = fourth.random_range(0..self.workload_ms / 2);
                    let dataset = DatasetOptions {
                        mode: if fourth.random_bool(0.5) {
                            Mode::Mrmw
                        } else {
                            Mode::Mrsw
                        },
                        replicas: fourth.random_range(least_replicas..=3),
                        pages: fourth.random_range(2..=12),
                        chunk_pages: fourth.random_range(1..=4),
                    };
                    let deleted_after_ms = fourth
                        .random_bool(0.3)
                        .then(|| fourth.random_range(100..=2_000));
                    Made {
                        at_ms,
                        dataset,
                        deleted_after_ms,
                    }
                })
                .collect();
        }
        self
    }

    /// From the seed's third stream, as `with_one_sided`: a seed without storing threads
    /// runs the world it ran before they came.
    fn with_storers(mut self) -> Options {
        let mut third = self.stream(2);
        self.storers = third.random_bool(0.5);
        self
    }

    /// Drawn from the seed's second stream, not from `rng`: drawing it changes none of the
    /// seed's other choices, so a seed without one-sided reads runs the world it ran before
    /// the option came.
    fn with_one_sided(mut self) -> Options {
        let mut second = self.stream(1);
        self.one_sided = second.random_bool(0.5);
        self
    }

    /// The seed's generator on stream `n` (0 draws the first options): an option drawn from
    /// a stream of its own changes none of the seed's other choices.
    fn stream(&self, n: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(n);
        rng
    }

    /// Drawn last, so a seed's other options are what they were before merging.
    fn with_merging(mut self, rng: &mut ChaCha8Rng) -> Options {
        self.merging = rng.random_bool(0.5);
        self
    }

    /// Drawn after promotion, so a seed's other options are what they were before versions.
    fn with_version_block(mut self, rng: &mut ChaCha8Rng) -> Options {
        self.version_block = rng.random_range(1..=6);
        self
    }

    /// Whether a live node's heartbeats may fail to reach the dispatcher for long enough that
    /// it counts the node down (a cut, or lost messages; with promotion neither happens).
    pub fn silences_live_nodes(&self) -> bool {
        self.promote_after_ms == 0 && (self.dispatcher_cut || self.loss_per_mille > 0)
    }

    /// Drawn last, so the other options of a seed are what they were before promotion.
    fn with_promotion(mut self, rng: &mut ChaCha8Rng) -> Options {
        let replicated = self.datasets.iter().all(|dataset| dataset.replicas >= 2);
        if self.crashes && replicated && rng.random_bool(0.5) {
            self.promote_after_ms = 4_000;
            self.dispatcher_cut = false;
        }
        self
    }
}

impl fmt::Display for DatasetOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} r{} {}p/{}pc",
            self.mode, self.replicas, self.pages, self.chunk_pages
        )
    }
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}: {} nodes, datasets [", self.seed, self.nodes)?;
        for (i, dataset) in self.datasets.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{dataset}")?;
        }
        write!(f, "]")?;
        if !self.created.is_empty() {
            write!(f, ", made while running [")?;
            for (i, made) in self.created.iter().enumerate() {
                let sep = if i == 0 { "" } else { ", " };
                write!(f, "{sep}{} at {} ms", made.dataset, made.at_ms)?;
                if let Some(after) = made.deleted_after_ms {
                    write!(f, ", deleted {after} ms later")?;
                }
            }
            write!(f, "]")?;
        }
        if let Some(at_ms) = self.late_join_ms {
            write!(f, ", node {} joins at {at_ms} ms", self.nodes + 1)?;
        }
        write!(
            f,
            ", loss {}‰, dup {}‰, delay {}..{} ms, partitions {}{}{}, crashes {}{}{}{}{}, dispatcher crashes {}, promotion {}, version blocks of {}, merging {}, one-sided reads {}, storing threads {}{}, workload {} ms",
            self.loss_per_mille,
            self.duplicate_per_mille,
            self.delay_ms.0,
            self.delay_ms.1,
            self.partitions,
            if self.one_way { " (one-way too)" } else { "" },
            if self.dispatcher_cut { " (dispatcher too)" } else { "" },
            self.crashes,
            if self.torn_writes { " torn" } else { "" },
            if self.crash_mid_step { " mid-step" } else { "" },
            if self.wipes { " wipes" } else { "" },
            if self.long_outages { ", outages up to 6 s" } else { "" },
            self.dispatcher_crashes,
            match self.promote_after_ms {
                0 => "never".to_string(),
                ms => format!("after {ms} ms"),
            },
            self.version_block,
            self.merging,
            self.one_sided,
            self.storers,
            if self.write_calls { " (write(2) too)" } else { "" },
            self.workload_ms,
        )?;
        if self.bugs != Bugs::default() {
            write!(f, ", planted {:?}", self.bugs)?;
        }
        Ok(())
    }
}
