//! The programs on the nodes: each node runs one client that commits stamped stores and
//! reads pages, one operation at a time. With `storers`, each node's program has a second
//! thread too, which stores into pages of MRMW datasets (and of MRSW ones its node has open
//! for writing) through its kernel's copies, in a slot of its own, and never msyncs: the
//! kernel writes the page back (staged), and the node's next commit of the dataset takes it.
//! Its store is acknowledged when a commit of that node begun after the store was staged is;
//! a commit that fails gives it up with everything staged (in doubt). It reads a page first
//! when its kernel holds none, and half the time it stores into a page the first thread is
//! committing. An MRSW dataset is written only between an open for
//! writing, which takes its write lease (refused while another live node holds it), and the
//! close that gives it back, a few writes later; any node may open it — unless the world
//! can keep a live node's heartbeats from the dispatcher, which then hands its lease to
//! another while it still writes (no fencing yet: docs/design.md, "Cluster protocol", the
//! write lease); there one node per MRSW dataset opens it and never closes it.
//!
//! Now and then a node views a dataset at the latest version it was told (`name@latest`),
//! or one or two below it (`name@v`): it pins that version at every owner, reads a few pages
//! at it, and unpins it.
//!
//! A store writes its operation's number into the committing node's own 64-byte slot of
//! each page (eight equal words), so any page read tells which commit of which node each
//! slot comes from. Records every commit's fate. The number is scrambled into its word
//! (`word_of`), so a word's bytes vary, zero bytes included, from commit to commit: a commit
//! that sent only some bytes of its slot shows as a torn slot.

use std::collections::BTreeMap;
use std::fmt;

use hotpot_core::proto::node::{Op, OpDone, OpId, OpResult};
use hotpot_core::proto::types::{Dataset, DatasetId, Mode, NodeId};
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

pub const SLOT_BYTES: usize = 64;

/// A node's storing thread is writer `node + STORING` (its committing thread: `node`).
pub const STORING: NodeId = 16;

/// Where writer `writer`'s stamps go in every page.
pub fn slot_offset(writer: NodeId) -> usize {
    writer as usize * SLOT_BYTES
}

pub fn stamp_bytes(stamp: u64) -> Vec<u8> {
    std::iter::repeat_n(word_of(stamp).to_le_bytes(), SLOT_BYTES / 8)
        .flatten()
        .collect()
}

/// Odd, so multiplying by it is a bijection of u64.
const SCRAMBLE: u64 = 0x9e37_79b9_7f4a_7c15;

/// A stamp's word: a bijection, 0 (never written) to 0.
pub fn word_of(stamp: u64) -> u64 {
    let word = stamp.wrapping_mul(SCRAMBLE);
    word ^ (word >> 32)
}

/// The stamp whose word is `word` (`word_of` undone).
pub fn stamp_of(word: u64) -> u64 {
    // x ^ (x >> 32) is its own inverse; the multiplier's inverse modulo 2^64 by Newton's
    // iteration (each step doubles the correct low bits: 3, 6, 12, 24, 48, 96).
    let mut inverse = SCRAMBLE;
    for _ in 0..5 {
        inverse = inverse.wrapping_mul(2u64.wrapping_sub(SCRAMBLE.wrapping_mul(inverse)));
    }
    (word ^ (word >> 32)).wrapping_mul(inverse)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    InFlight,
    Acked,
    /// Nothing of it was applied (the machine said so).
    Refused,
    /// Not acknowledged; it may have been applied.
    InDoubt,
}

#[derive(Clone, Debug)]
pub struct WriteRecord {
    pub node: NodeId,
    /// Whose slot it writes: `node`, or its storing thread's.
    pub writer: NodeId,
    pub dataset: DatasetId,
    pub pages: Vec<u64>,
    pub status: Status,
    pub started_ms: u64,
    /// When the program got the acknowledgement.
    pub acked_ms: Option<u64>,
    /// The dataset version the acknowledgement named (a store: the commit's that took it,
    /// which may have carried it at an earlier version already).
    pub dataset_version: u64,
}

impl WriteRecord {
    /// A storing thread's store, committed by its node's commits.
    pub fn is_store(&self) -> bool {
        self.writer != self.node
    }
}

/// How the programs' writes ended, per kind: `[acknowledged, in doubt, refused, never
/// committed]` (a store no commit took before the seed ended; a commit has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub commits: [u64; 4],
    pub stores: [u64; 4],
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [acked, in_doubt, refused, _] = self.commits;
        write!(
            f,
            "{acked} commits acknowledged, {in_doubt} in doubt, {refused} refused"
        )?;
        let [acked, in_doubt, refused, staged] = self.stores;
        if self.stores != [0; 4] {
            write!(
                f,
                "; stores: {acked} acknowledged by a later commit, {in_doubt} in doubt, {refused} refused, {staged} never committed"
            )?;
        }
        Ok(())
    }
}

/// How a write ended, as its program learned it.
#[derive(Clone, Copy, Debug)]
enum Ended {
    Acked { dataset_version: u64, at_ms: u64 },
    Refused,
    InDoubt,
}

/// A node's two program threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    Committing,
    Storing,
}

/// A read that finished: what it returned.
#[derive(Clone, Debug)]
pub struct ReadRecord {
    pub node: NodeId,
    pub dataset: DatasetId,
    pub page: u64,
    pub started_ms: u64,
    pub version: u64,
    pub bytes: Vec<u8>,
    /// Its owner did not answer: the copy is the newest among the nodes that did.
    pub failed_over: bool,
}

/// A read of a view that was answered: a page as it was at the view's version.
#[derive(Clone, Debug)]
pub struct ViewReadRecord {
    pub node: NodeId,
    pub dataset: DatasetId,
    pub page: u64,
    pub version: u64,
    pub started_ms: u64,
    pub bytes: Vec<u8>,
}

/// A view a node has pinned (or is about to pin), and the reads it still makes.
#[derive(Clone, Copy, Debug)]
struct View {
    view: u64,
    dataset: DatasetId,
    version: u64,
    reads_left: u32,
}

/// A `Latest` that was answered: an MRMW dataset's newest version given out.
#[derive(Clone, Debug)]
pub struct LatestRecord {
    pub node: NodeId,
    pub dataset: DatasetId,
    pub started_ms: u64,
    pub answered_ms: u64,
    pub version: u64,
}

#[derive(Clone, Debug)]
enum Running {
    Write,
    /// A storing thread's store, written back without msync.
    Store {
        dataset: DatasetId,
    },
    /// Opening an MRSW dataset for writing; once opened, this many writes before it closes.
    Open {
        dataset: DatasetId,
        writes: u32,
    },
    Close {
        dataset: DatasetId,
    },
    Latest {
        dataset: DatasetId,
        started_ms: u64,
    },
    Read {
        dataset: DatasetId,
        page: u64,
        started_ms: u64,
    },
    Pin,
    ReadAt {
        page: u64,
        started_ms: u64,
    },
    Unpin,
}

pub struct Workload {
    datasets: Vec<(Dataset, u64)>,
    nodes: Vec<NodeId>,
    /// The MRSW datasets each node has open for writing, with the writes left before it
    /// closes them.
    open: BTreeMap<(NodeId, DatasetId), u32>,
    /// The one node that opens each MRSW dataset, when the lease may not change hands.
    writers: Option<BTreeMap<DatasetId, NodeId>>,
    /// Storing threads also store with write(2) (`Options::write_calls`).
    write_calls: bool,
    /// Every commit started, by its stamp (the operation number).
    pub writes: BTreeMap<OpId, WriteRecord>,
    /// Acknowledged commits per (dataset, page, committing node), in acknowledgement order.
    pub acked: BTreeMap<(DatasetId, u64, NodeId), Vec<OpId>>,
    /// Every `Latest` answered.
    pub latests: Vec<LatestRecord>,
    /// Every view read answered.
    pub view_reads: Vec<ViewReadRecord>,
    /// Each node's view: to pin (after a `Latest`), or pinned.
    views: BTreeMap<NodeId, (View, bool)>,
    running: BTreeMap<NodeId, (OpId, Running)>,
    /// Each node's storing thread's operation.
    storing: BTreeMap<NodeId, (OpId, Running)>,
    /// Per node and dataset, the stores staged and not taken by a commit begun since.
    pending: BTreeMap<(NodeId, DatasetId), Vec<OpId>>,
    /// Per commit running, the stores it takes.
    takes: BTreeMap<OpId, Vec<OpId>>,
    /// Each node's last page read: its next write often stores into it (read-modify-write,
    /// which through a mapping is the kernel's write-back of the page it read).
    last_read: BTreeMap<NodeId, (DatasetId, u64)>,
    next_op: OpId,
}

impl Workload {
    /// `fixed_writers`: one node writes each MRSW dataset, and keeps it open; `write_calls`:
    /// storing threads also store with write(2).
    pub fn new(
        datasets: &[(Dataset, u64)],
        nodes: &[NodeId],
        fixed_writers: bool,
        write_calls: bool,
    ) -> Workload {
        let mut workload = Workload {
            datasets: Vec::new(),
            nodes: nodes.to_vec(),
            open: BTreeMap::new(),
            writers: fixed_writers.then(BTreeMap::new),
            write_calls,
            writes: BTreeMap::new(),
            acked: BTreeMap::new(),
            latests: Vec::new(),
            view_reads: Vec::new(),
            views: BTreeMap::new(),
            running: BTreeMap::new(),
            storing: BTreeMap::new(),
            pending: BTreeMap::new(),
            takes: BTreeMap::new(),
            last_read: BTreeMap::new(),
            next_op: 1,
        };
        for (dataset, pages) in datasets {
            workload.add_dataset(dataset, *pages);
        }
        workload
    }

    /// A dataset the programs use from now on, of `pages` pages (with fixed writers, an
    /// MRSW one gets its one writer).
    pub fn add_dataset(&mut self, dataset: &Dataset, pages: u64) {
        if let Some(writers) = &mut self.writers {
            if dataset.params.mode == Mode::Mrsw {
                let writer = self.nodes[(dataset.id as usize * 2) % self.nodes.len()];
                writers.insert(dataset.id, writer);
            }
        }
        self.datasets.push((dataset.clone(), pages));
    }

    /// A dataset the programs use no more (deleted): what runs on it ends as it ends, and
    /// a view of it goes on to its unpin.
    pub fn remove_dataset(&mut self, dataset: DatasetId) {
        self.datasets.retain(|(known, _)| known.id != dataset);
        self.open.retain(|(_, open), _| *open != dataset);
    }

    pub fn busy(&self, node: NodeId, thread: Thread) -> bool {
        match thread {
            Thread::Committing => self.running.contains_key(&node),
            Thread::Storing => self.storing.contains_key(&node),
        }
    }

    /// How every write started ended (one running at the end counts as never committed).
    pub fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        for write in self.writes.values() {
            let kind = if write.is_store() {
                &mut tally.stores
            } else {
                &mut tally.commits
            };
            let at = match write.status {
                Status::Acked => 0,
                Status::InDoubt => 1,
                Status::Refused => 2,
                Status::InFlight => 3,
            };
            kind[at] += 1;
        }
        tally
    }

    /// Which of the node's threads runs `op`.
    pub fn thread_of(&self, node: NodeId, op: OpId) -> Option<Thread> {
        if self
            .running
            .get(&node)
            .is_some_and(|(running, _)| *running == op)
        {
            Some(Thread::Committing)
        } else if self
            .storing
            .get(&node)
            .is_some_and(|(running, _)| *running == op)
        {
            Some(Thread::Storing)
        } else {
            None
        }
    }

    pub fn idle(&self) -> bool {
        self.running.is_empty() && self.storing.is_empty()
    }

    /// The node's next operation: the close of an MRSW dataset it wrote enough, or now and
    /// then the open of one; a write where it may write, about half the time; else a read,
    /// or now and then a dataset's latest version (`hotpot stat`). A view's pin, reads and
    /// unpin come first when the node has one going.
    pub fn next_op(&mut self, node: NodeId, rng: &mut ChaCha8Rng, now_ms: u64) -> Op {
        let op = self.next_op;
        self.next_op += 1;
        if let Some(view_op) = self.view_op(node, op, rng, now_ms) {
            return view_op;
        }
        let done = self
            .open
            .iter()
            .find(|((by, _), left)| *by == node && **left == 0)
            .map(|((_, dataset), _)| *dataset);
        if let Some(dataset) = done {
            self.running.insert(node, (op, Running::Close { dataset }));
            return Op::Close { op, dataset };
        }
        let closed: Vec<DatasetId> = self
            .datasets
            .iter()
            .filter(|(dataset, _)| dataset.params.mode == Mode::Mrsw)
            .map(|(dataset, _)| dataset.id)
            .filter(|dataset| !self.open.contains_key(&(node, *dataset)))
            .filter(|dataset| match &self.writers {
                Some(writers) => writers.get(dataset) == Some(&node),
                None => true,
            })
            .collect();
        if !closed.is_empty() && rng.random_bool(0.15) {
            let dataset = *closed.choose(rng).expect("not empty");
            let writes = match self.writers {
                Some(_) => u32::MAX,
                None => rng.random_range(1..=6),
            };
            self.running
                .insert(node, (op, Running::Open { dataset, writes }));
            return Op::Open { op, dataset };
        }
        let writable: Vec<&(Dataset, u64)> = self
            .datasets
            .iter()
            .filter(|(dataset, _)| match dataset.params.mode {
                Mode::Mrmw => true,
                Mode::Mrsw => self.open.contains_key(&(node, dataset.id)),
            })
            .collect();
        if !writable.is_empty() && rng.random_bool(0.55) {
            let read_back = self.last_read.remove(&node).filter(|(dataset, _)| {
                writable.iter().any(|(writable, _)| writable.id == *dataset)
            });
            let (chosen_dataset, chosen) = match read_back {
                Some((dataset, page)) if rng.random_bool(0.5) => (dataset, vec![page]),
                _ => {
                    let (dataset, pages) = *writable.choose(rng).expect("not empty");
                    // Commits of either mode may span owners (three phases).
                    let candidates: Vec<u64> = (0..*pages).collect();
                    let count = rng.random_range(1..=candidates.len().min(4));
                    let chosen = candidates.choose_multiple(rng, count).copied().collect();
                    (dataset.id, chosen)
                }
            };
            let (dataset, _) = *writable
                .iter()
                .find(|(dataset, _)| dataset.id == chosen_dataset)
                .expect("a writable dataset");
            if let Some(left) = self.open.get_mut(&(node, dataset.id)) {
                *left -= 1;
            }
            let stamp = stamp_bytes(op);
            let offset = slot_offset(node) as u16;
            let staged = self.pending.remove(&(node, dataset.id)).unwrap_or_default();
            self.takes.insert(op, staged);
            let stores = chosen
                .iter()
                .map(|page| (*page, offset, stamp.clone()))
                .collect();
            self.writes.insert(
                op,
                WriteRecord {
                    node,
                    writer: node,
                    dataset: dataset.id,
                    pages: chosen,
                    status: Status::InFlight,
                    started_ms: now_ms,
                    acked_ms: None,
                    dataset_version: 0,
                },
            );
            self.running.insert(node, (op, Running::Write));
            Op::Write {
                op,
                dataset: dataset.id,
                stores,
                msync: true,
            }
        } else {
            let (dataset, pages) = self.datasets.choose(rng).expect("a dataset");
            // An MRSW dataset's latest version comes from its writer, or with none the
            // dispatcher counts live, from the next block: where the dispatcher may count a
            // live writer down, that is no bound (no fencing), so it is not asked there.
            let sound = dataset.params.mode == Mode::Mrmw || self.writers.is_none();
            if rng.random_bool(0.2) && sound {
                let running = Running::Latest {
                    dataset: dataset.id,
                    started_ms: now_ms,
                };
                self.running.insert(node, (op, running));
                return Op::Latest {
                    op,
                    dataset: dataset.id,
                };
            }
            let page = rng.random_range(0..*pages);
            self.last_read.insert(node, (dataset.id, page));
            self.running.insert(
                node,
                (
                    op,
                    Running::Read {
                        dataset: dataset.id,
                        page,
                        started_ms: now_ms,
                    },
                ),
            );
            Op::Read {
                op,
                dataset: dataset.id,
                page,
            }
        }
    }

    /// The storing thread's next operation, on an MRMW dataset or an MRSW one its node has
    /// open for writing (`None`: there is none, or the page it chose is `locked` by a write
    /// running): a store of its stamp into a page its kernel holds (`cached`: the kernel's
    /// copy), written back without msync, or else a read of that page (the fault that brings
    /// it). Half the time the page is one the committing thread is committing.
    pub fn next_store(
        &mut self,
        node: NodeId,
        rng: &mut ChaCha8Rng,
        now_ms: u64,
        cached: impl Fn(DatasetId, u64) -> Option<Vec<u8>>,
        locked: impl Fn(DatasetId, u64) -> bool,
    ) -> Option<Op> {
        let writable: Vec<(DatasetId, u64)> = self
            .datasets
            .iter()
            .filter(|(dataset, _)| match dataset.params.mode {
                Mode::Mrmw => true,
                Mode::Mrsw => self.open.contains_key(&(node, dataset.id)),
            })
            .map(|(dataset, pages)| (dataset.id, *pages))
            .collect();
        let committing = self
            .running
            .get(&node)
            .and_then(|(op, _)| self.writes.get(op))
            .filter(|write| {
                writable
                    .iter()
                    .any(|(dataset, _)| *dataset == write.dataset)
            });
        let (dataset, page) = match committing {
            Some(write) if rng.random_bool(0.5) => {
                (write.dataset, *write.pages.choose(rng).expect("a page"))
            }
            _ => {
                let (dataset, pages) = *writable.choose(rng)?;
                (dataset, rng.random_range(0..pages))
            }
        };
        if locked(dataset, page) {
            return None;
        }
        let op = self.next_op;
        self.next_op += 1;
        let writer = node + STORING;
        let at = slot_offset(writer);
        // write(2): its slot only, past the kernel's cache, whether or not it holds the page.
        let write_call = self.write_calls && rng.random_bool(0.5);
        let cached = if write_call {
            None
        } else {
            let Some(bytes) = cached(dataset, page) else {
                let read = Running::Read {
                    dataset,
                    page,
                    started_ms: now_ms,
                };
                self.storing.insert(node, (op, read));
                return Some(Op::Read { op, dataset, page });
            };
            Some(bytes)
        };
        self.writes.insert(
            op,
            WriteRecord {
                node,
                writer,
                dataset,
                pages: vec![page],
                status: Status::InFlight,
                started_ms: now_ms,
                acked_ms: None,
                dataset_version: 0,
            },
        );
        self.storing.insert(node, (op, Running::Store { dataset }));
        Some(match cached {
            Some(mut bytes) => {
                bytes[at..at + SLOT_BYTES].copy_from_slice(&stamp_bytes(op));
                Op::WriteBack {
                    op,
                    dataset,
                    pages: vec![(page, bytes)],
                    msync: false,
                }
            }
            None => Op::Write {
                op,
                dataset,
                stores: vec![(page, at as u16, stamp_bytes(op))],
                msync: false,
            },
        })
    }

    /// The next step of the node's view, if it has one: its pin, then (about half the time)
    /// a read at its version, and after its reads its unpin.
    fn view_op(&mut self, node: NodeId, op: OpId, rng: &mut ChaCha8Rng, now_ms: u64) -> Option<Op> {
        let (view, pinned) = *self.views.get(&node)?;
        let (running, next) = if !pinned {
            let pin = Op::Pin {
                op,
                dataset: view.dataset,
                view: view.view,
                version: view.version,
            };
            (Running::Pin, pin)
        } else if view.reads_left == 0 {
            let unpin = Op::Unpin {
                op,
                dataset: view.dataset,
                view: view.view,
            };
            (Running::Unpin, unpin)
        } else if rng.random_bool(0.5) {
            let pages = self
                .datasets
                .iter()
                .find(|(dataset, _)| dataset.id == view.dataset)
                .map_or(1, |(_, pages)| *pages);
            let page = rng.random_range(0..pages);
            if let Some((view, _)) = self.views.get_mut(&node) {
                view.reads_left -= 1;
            }
            let read = Op::ReadAt {
                op,
                dataset: view.dataset,
                version: view.version,
                page,
            };
            (
                Running::ReadAt {
                    page,
                    started_ms: now_ms,
                },
                read,
            )
        } else {
            return None;
        };
        self.running.insert(node, (op, running));
        Some(next)
    }

    /// An operation of the node's `thread` finished; a read is returned for the checker.
    pub fn finish(
        &mut self,
        node: NodeId,
        thread: Thread,
        done: &OpDone,
        now_ms: u64,
    ) -> Option<ReadRecord> {
        let threads = match thread {
            Thread::Committing => &mut self.running,
            Thread::Storing => &mut self.storing,
        };
        let (op, running) = threads.remove(&node)?;
        assert_eq!(op, done.op, "a thread runs one operation at a time");
        if let Running::Store { dataset } = running {
            match &done.result {
                OpResult::Staged => self.pending.entry((node, dataset)).or_default().push(op),
                OpResult::Refused(_) => self.settle(op, Ended::Refused),
                _ => self.settle(op, Ended::InDoubt),
            }
            return None;
        }
        let taken = self.takes.remove(&op).unwrap_or_default();
        if let Some(write) = self.writes.get(&op) {
            let dataset = write.dataset;
            let ended = match &done.result {
                OpResult::Committed { dataset_version } => Ended::Acked {
                    dataset_version: *dataset_version,
                    at_ms: now_ms,
                },
                OpResult::Refused(_) => Ended::Refused,
                _ => Ended::InDoubt,
            };
            self.settle(op, ended);
            if let Ended::Acked { .. } = ended {
                for store in taken {
                    self.settle(store, ended);
                }
            } else {
                // A failed commit gives up everything staged, also what was staged since.
                let since = self.pending.remove(&(node, dataset)).unwrap_or_default();
                for store in taken.into_iter().chain(since) {
                    self.settle(store, Ended::InDoubt);
                }
            }
        }
        match (running, &done.result) {
            (Running::Open { dataset, writes }, OpResult::Opened) => {
                self.open.insert((node, dataset), writes);
                None
            }
            (Running::Close { dataset }, _) => {
                self.open.remove(&(node, dataset));
                None
            }
            (
                Running::Latest {
                    dataset,
                    started_ms,
                },
                OpResult::Latest { version },
            ) => {
                self.latests.push(LatestRecord {
                    node,
                    dataset,
                    started_ms,
                    answered_ms: now_ms,
                    version: *version,
                });
                // About a third of the answers are viewed, unless the node has a view going:
                // at that version (`name@latest`), or one or two below it (`name@v`), which
                // an owner may no longer keep.
                if !self.views.contains_key(&node) && op % 3 == 0 {
                    let view = View {
                        view: op,
                        dataset,
                        version: version.saturating_sub((op / 3) % 3),
                        reads_left: 1 + (op % 4) as u32,
                    };
                    self.views.insert(node, (view, false));
                }
                None
            }
            (Running::Pin, OpResult::Pinned) => {
                if let Some((_, pinned)) = self.views.get_mut(&node) {
                    *pinned = true;
                }
                None
            }
            (Running::Pin | Running::Unpin, _) => {
                // Unpinned, or its pin refused (stale, an owner away): the view ends.
                self.views.remove(&node);
                None
            }
            (Running::ReadAt { page, started_ms }, OpResult::ReadAt { bytes }) => {
                if let Some((view, _)) = self.views.get(&node) {
                    self.view_reads.push(ViewReadRecord {
                        node,
                        dataset: view.dataset,
                        page,
                        version: view.version,
                        started_ms,
                        bytes: bytes.clone(),
                    });
                }
                None
            }
            (
                Running::Read {
                    dataset,
                    page,
                    started_ms,
                },
                OpResult::Read {
                    version,
                    bytes,
                    failed_over,
                },
            ) => Some(ReadRecord {
                node,
                dataset,
                page,
                started_ms,
                version: *version,
                bytes: bytes.clone(),
                failed_over: *failed_over,
            }),
            _ => None,
        }
    }

    /// Write `op` ended: acknowledged, it is due on every page it wrote.
    fn settle(&mut self, op: OpId, ended: Ended) {
        let Some(write) = self.writes.get_mut(&op) else {
            return;
        };
        write.status = match ended {
            Ended::Acked {
                dataset_version,
                at_ms,
            } => {
                write.acked_ms = Some(at_ms);
                write.dataset_version = dataset_version;
                for page in &write.pages {
                    let key = (write.dataset, *page, write.writer);
                    self.acked.entry(key).or_default().push(op);
                }
                Status::Acked
            }
            Ended::Refused => Status::Refused,
            Ended::InDoubt => Status::InDoubt,
        };
    }

    /// The node died: its running commit is in doubt, and so is every store it staged;
    /// what its programs opened is closed.
    pub fn node_crashed(&mut self, node: NodeId) {
        self.open.retain(|(by, _), _| *by != node);
        self.views.remove(&node);
        let mut lost: Vec<OpId> = Vec::new();
        if let Some((op, _)) = self.running.remove(&node) {
            lost.push(op);
            lost.extend(self.takes.remove(&op).unwrap_or_default());
        }
        if let Some((op, _)) = self.storing.remove(&node) {
            lost.push(op);
        }
        let staged: Vec<(NodeId, DatasetId)> = self
            .pending
            .keys()
            .filter(|(by, _)| *by == node)
            .copied()
            .collect();
        for key in staged {
            lost.extend(self.pending.remove(&key).unwrap_or_default());
        }
        for op in lost {
            self.settle(op, Ended::InDoubt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{stamp_of, word_of};

    #[test]
    fn a_stamp_comes_back_from_its_word() {
        for stamp in [0, 1, 255, 256, 65_535, 1 << 40, u64::MAX] {
            assert_eq!(stamp_of(word_of(stamp)), stamp, "stamp {stamp}");
        }
        assert_eq!(word_of(0), 0, "never written reads as stamp 0");
        let zero_bytes = (1..2_000u64)
            .filter(|stamp| word_of(*stamp).to_le_bytes().contains(&0))
            .count();
        assert!(zero_bytes > 20, "words have zero bytes: {zero_bytes}");
    }
}
