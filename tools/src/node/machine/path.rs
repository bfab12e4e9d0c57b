//! The node machine as the file system's data path (`hotpot node --machine`): each FUSE call
//! is one or a few of the machine's operations (docs/design.md, step 1): READ is `Op::Read`
//! per page, WRITE `Op::Write` without msync (or, for whole pages the kernel holds, its
//! write-back, `Op::WriteBack`), FSYNC and the last writer's RELEASE `Op::Commit`, an MRSW
//! open for writing `Op::Open` and its close `Op::Close`, and the `.versions` tree `Op::Pin`,
//! `Op::ReadAt`, `Op::Unpin`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpot_core::page::ViewKey;
use hotpot_core::pm::{PoolUsage, PAGE_BYTES};
use hotpot_core::proto::messages::{NodeReply, NodeRequest};
use hotpot_core::proto::node::{Input, Op, OpResult};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, Ino};
use hotpot_fs::Invalidator;

use super::runtime::Runtime;
use crate::node::engine::{page_pieces, DataPath};
use crate::node::protocol::pm_error;

pub struct MachinePath {
    runtime: Arc<Runtime>,
    lease_wait: Duration,
    /// One commit at a time from this node, as the thread-based protocol's: two would take
    /// turns snapshotting the same dataset's staged pages.
    commit_lock: Mutex<()>,
    /// Datasets whose record the machine was given.
    told: Mutex<HashSet<DatasetId>>,
}

/// What an operation that should not end this way means to a program.
fn unexpected(what: &str, result: OpResult) -> FsError {
    match result {
        OpResult::Refused(error) => error,
        OpResult::InDoubt(why) => FsError::Io(format!("{what} in doubt: {why}")),
        other => FsError::Io(format!("{what} ended with {other:?}")),
    }
}

impl MachinePath {
    pub fn new(runtime: Arc<Runtime>, lease_wait: Duration) -> MachinePath {
        MachinePath {
            runtime,
            lease_wait,
            commit_lock: Mutex::new(()),
            told: Mutex::new(HashSet::new()),
        }
    }

    /// Give the machine `dataset`'s record (once): the file system has it from the
    /// dispatcher, and the machine's own list would leave out a file unlinked while open.
    fn tell(&self, dataset: &Dataset) {
        if self.told.lock().expect("told lock").insert(dataset.id) {
            self.runtime.feed(Input::Record(dataset.clone()));
        }
    }

    /// A program's operation on `dataset`.
    fn run(&self, dataset: &Dataset, op: impl FnOnce(u64) -> Op) -> OpResult {
        self.tell(dataset);
        self.runtime.run(op)
    }
}

impl DataPath for MachinePath {
    /// The machine names the open itself; the number given back is the operation's.
    fn start_writing(&self, dataset: &Dataset) -> Result<u64, FsError> {
        let deadline = Instant::now() + self.lease_wait;
        loop {
            let mut number = 0;
            let result = self.run(dataset, |op| {
                number = op;
                Op::Open {
                    op,
                    dataset: dataset.id,
                }
            });
            match result {
                OpResult::Opened => return Ok(number),
                OpResult::Refused(FsError::Busy(why)) if Instant::now() >= deadline => {
                    tracing::warn!(dataset = dataset.id, %why, "open for writing refused: the dataset has another writer");
                    return Err(FsError::Busy(why));
                }
                OpResult::Refused(FsError::Busy(_)) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => return Err(unexpected("open for writing", other)),
            }
        }
    }

    fn stop_writing(&self, dataset: &Dataset, _open: u64) {
        let result = self.run(dataset, |op| Op::Close {
            op,
            dataset: dataset.id,
        });
        if result != OpResult::Closed {
            tracing::error!(
                dataset = dataset.id,
                ?result,
                "cannot release the write lease"
            );
        }
    }

    fn read_page(&self, ino: Ino, dataset: &Dataset, page: u64) -> Result<Vec<u8>, FsError> {
        self.runtime.note_inode(ino, dataset.id);
        match self.run(dataset, |op| Op::Read {
            op,
            dataset: dataset.id,
            page,
        }) {
            OpResult::Read {
                bytes, failed_over, ..
            } if bytes.len() == PAGE_BYTES || bytes.is_empty() => {
                if failed_over {
                    tracing::warn!(
                        dataset = dataset.id,
                        page,
                        "owner unreachable: asking every live node for a copy (the newest one a live node has is read)"
                    );
                }
                // Empty: a page never written.
                Ok(if bytes.is_empty() {
                    vec![0; PAGE_BYTES]
                } else {
                    bytes
                })
            }
            other => Err(unexpected(&format!("read of page {page}"), other)),
        }
    }

    fn write(&self, ino: Ino, dataset: &Dataset, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.runtime.note_inode(ino, dataset.id);
        let stores: Vec<(u64, u16, Vec<u8>)> = page_pieces(offset, data.len())
            .map(|(page, within, bytes)| (page, within as u16, data[bytes].to_vec()))
            .collect();
        // Whole pages the kernel holds copies of are its write-back: staged against the base
        // its copies were read at. Anything else is a program's write past the cache.
        let written_back = self.runtime.with(|machine| {
            stores.iter().all(|(page, within, bytes)| {
                *within == 0
                    && bytes.len() == PAGE_BYTES
                    && machine.table().has_kernel_base((dataset.id, *page))
            })
        });
        let result = if written_back {
            let pages = stores
                .into_iter()
                .map(|(page, _, bytes)| (page, bytes))
                .collect();
            self.run(dataset, |op| Op::WriteBack {
                op,
                dataset: dataset.id,
                pages,
                msync: false,
            })
        } else {
            self.run(dataset, |op| Op::Write {
                op,
                dataset: dataset.id,
                stores,
                msync: false,
            })
        };
        match result {
            OpResult::Staged => Ok(()),
            other => Err(unexpected("write", other)),
        }
    }

    fn commit(&self, _ino: Ino, dataset: &Dataset) -> Result<usize, FsError> {
        let _one_at_a_time = self.commit_lock.lock().expect("commit lock");
        let staged = self
            .runtime
            .with(|machine| machine.table().dirty_pages(dataset.id).len());
        match self.run(dataset, |op| Op::Commit {
            op,
            dataset: dataset.id,
        }) {
            OpResult::Committed { .. } => Ok(staged),
            other => Err(unexpected("commit", other)),
        }
    }

    fn truncate(&self, dataset: DatasetId, size: u64) -> Result<(), FsError> {
        self.runtime
            .with_table(|table| table.truncate(dataset, size))
            .map_err(pm_error)
    }

    fn drop_dataset(&self, dataset: DatasetId) -> Result<(), FsError> {
        self.runtime
            .with_table(|table| table.drop_dataset(dataset))
            .map_err(pm_error)
    }

    fn usage(&self) -> PoolUsage {
        self.runtime.with(|machine| machine.table().pool().usage())
    }

    fn attach_invalidator(&self, invalidator: Invalidator) {
        self.runtime.attach_invalidator(invalidator);
    }

    fn latest(&self, dataset: &Dataset) -> Result<u64, FsError> {
        match self.run(dataset, |op| Op::Latest {
            op,
            dataset: dataset.id,
        }) {
            OpResult::Latest { version } => Ok(version),
            other => Err(unexpected("latest version", other)),
        }
    }

    fn pin(&self, view: ViewKey, dataset: &Dataset, version: u64) -> Result<(), FsError> {
        match self.run(dataset, |op| Op::Pin {
            op,
            dataset: dataset.id,
            view: view.1,
            version,
        }) {
            OpResult::Pinned => Ok(()),
            other => Err(unexpected("pin", other)),
        }
    }

    fn unpin(&self, view: ViewKey, dataset: &Dataset) {
        let result = self.run(dataset, |op| Op::Unpin {
            op,
            dataset: dataset.id,
            view: view.1,
        });
        if result != OpResult::Unpinned {
            tracing::warn!(?result, "unpin not done; the pins expire");
        }
    }

    fn read_at(
        &self,
        dataset: &Dataset,
        version: u64,
        pages: &[u64],
    ) -> Result<HashMap<u64, Vec<u8>>, FsError> {
        self.tell(dataset);
        // Every page at once: each comes from its owner, and one after another the view's
        // reads would pay a round trip per page.
        let results = self.runtime.run_all(pages.iter().map(|page| {
            move |op| Op::ReadAt {
                op,
                dataset: dataset.id,
                version,
                page: *page,
            }
        }));
        pages
            .iter()
            .zip(results)
            .map(|(page, result)| match result {
                OpResult::ReadAt { bytes } => Ok((*page, bytes)),
                other => Err(unexpected(
                    &format!("read of page {page} at {version}"),
                    other,
                )),
            })
            .collect()
    }

    /// Asked of each owner as a tool asks (the machine has no operation for it).
    fn pinned_versions(&self, dataset: &Dataset) -> BTreeSet<u64> {
        let owners: BTreeSet<_> = self.runtime.with(|machine| {
            dataset
                .owners
                .iter()
                .map(|owner| *machine.successors().get(owner).unwrap_or(owner))
                .collect()
        });
        let mut versions = BTreeSet::new();
        for owner in owners {
            let request = NodeRequest::PinnedVersions {
                dataset: dataset.id,
            };
            let reply = if owner == self.runtime.id() {
                Some(self.runtime.serve(request))
            } else {
                self.runtime.peers().client(owner).and_then(|client| {
                    client
                        .call::<_, NodeReply>(&request, hotpot_net::DEFAULT_TIMEOUT)
                        .ok()
                })
            };
            if let Some(NodeReply::Versions(pinned)) = reply {
                versions.extend(pinned);
            }
        }
        versions
    }
}
