//! The daemon's thread-based protocol (node/protocol.rs and its committer) as the file
//! system's data path. Must survive: an owner rejoining (reads and writes of pages this node
//! owns wait for its rejoin), a copy that may be behind its owner's (read from the owner).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpot_core::page::{PageTable, ReadOutcome, ViewKey};
use hotpot_core::pm::{PageKey, PoolUsage, PAGE_BYTES};
use hotpot_core::proto::messages::{DispatcherRequest, NodeReply, NodeRequest};
use hotpot_core::proto::staged::{Ended, StagedCommit};
use hotpot_core::proto::types::*;
use hotpot_fs::Invalidator;
use hotpot_net::Client;

use super::data::{page_pieces, DataPath};
use super::dispatcher;
use crate::node::committer::ask;
use crate::node::protocol::{pm_error, Protocol};

/// Pages asked of one owner in one `ReadAt`.
const READ_AT_PAGES_MAX: usize = 64;

pub struct ProtocolPath {
    protocol: Arc<Protocol>,
    dispatcher: Arc<Client>,
    lease_wait: Duration,
    /// One commit at a time from this node: two would snapshot the same staged pages.
    commit_lock: Mutex<()>,
}

/// Whether this node's stored copy of `key` may be behind its owner's: the owner has not
/// confirmed it since this node's start (`unconfirmed`), or a newer copy is prepared here,
/// waiting for a decision that may have been lost (found by hotpot-sim, seed 10081251: this
/// node's next commit, diffed against the older copy, tore its own acknowledged one). Such a
/// page is read from its owner, as the node machine's reads and writes do.
fn behind(unconfirmed: bool, table: &PageTable, key: PageKey) -> bool {
    unconfirmed || table.in_prepared(key)
}

impl ProtocolPath {
    pub fn new(protocol: Arc<Protocol>, dispatcher: Arc<Client>, lease_wait: Duration) -> Self {
        ProtocolPath {
            protocol,
            dispatcher,
            lease_wait,
            commit_lock: Mutex::new(()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, PageTable> {
        self.protocol.table()
    }

    /// A page this node owns is read or written here only once its rejoin as an owner is
    /// over (bounded wait): during a take-over its copy may be older than another node's (the
    /// node machine's rule, found by hotpot-sim, seed 14095132).
    fn settled_owner(&self, dataset: &Dataset, page: u64) -> Result<(), FsError> {
        if !self.protocol.is_ready() && self.protocol.owner_of(dataset, page) == self.protocol.id {
            self.protocol.wait_ready()?;
        }
        Ok(())
    }

    /// The owners of `dataset` now.
    fn owners(&self, dataset: &Dataset) -> BTreeSet<NodeId> {
        dataset
            .owners
            .iter()
            .map(|node| self.protocol.peers.resolve(*node))
            .collect()
    }

    fn unpin_at(&self, view: ViewKey, owners: &[NodeId]) {
        for owner in owners {
            if let Err(error) = ask(&self.protocol, *owner, NodeRequest::Unpin { view }) {
                tracing::warn!(owner, %error, "unpin not delivered; the pin expires");
            }
        }
    }

    /// For the pin lease thread: the views pinned here (`pinned`) by owner, whose pins it
    /// renews.
    pub fn by_owner(&self, pinned: Vec<(ViewKey, Dataset)>) -> Vec<(NodeId, Vec<ViewKey>)> {
        let mut by_owner: HashMap<NodeId, Vec<ViewKey>> = HashMap::new();
        for (view, dataset) in pinned {
            for owner in self.owners(&dataset) {
                by_owner.entry(owner).or_default().push(view);
            }
        }
        by_owner.into_iter().collect()
    }
}

impl DataPath for ProtocolPath {
    /// MRSW: take the dataset's write lease, retrying for `lease_wait`; then EBUSY. The open
    /// it was taken for is a number this node never uses twice, across its starts too: its
    /// transaction sequence.
    fn start_writing(&self, dataset: &Dataset) -> Result<u64, FsError> {
        let deadline = Instant::now() + self.lease_wait;
        let open = self.protocol.next_tx().1;
        loop {
            let request = DispatcherRequest::AcquireLease {
                dataset: dataset.id,
                node: self.protocol.id,
                open,
            };
            match dispatcher::ask(&self.dispatcher, &request) {
                Ok(_) => {
                    if let Err(error) = self.protocol.start_writing(dataset) {
                        // No versions to write with: the lease goes back at once.
                        self.stop_writing(dataset, open);
                        return Err(error);
                    }
                    return Ok(open);
                }
                Err(FsError::Busy(why)) if Instant::now() >= deadline => {
                    tracing::warn!(dataset = dataset.id, %why, "open for writing refused: the dataset has another writer");
                    return Err(FsError::Busy(why));
                }
                Err(FsError::Busy(_)) => std::thread::sleep(Duration::from_millis(50)),
                Err(other) => return Err(other),
            }
        }
    }

    fn stop_writing(&self, dataset: &Dataset, open: u64) {
        self.protocol.stop_writing(dataset);
        let request = DispatcherRequest::ReleaseLease {
            dataset: dataset.id,
            node: self.protocol.id,
            open,
        };
        if let Err(error) = dispatcher::ask(&self.dispatcher, &request) {
            tracing::error!(dataset = dataset.id, %error, "cannot release the write lease");
        }
    }

    fn read_page(&self, ino: Ino, dataset: &Dataset, page: u64) -> Result<Vec<u8>, FsError> {
        self.protocol.note_cached(ino, dataset.id);
        let key = (dataset.id, page);
        self.settled_owner(dataset, page)?;
        // A copy its owner has not confirmed since this node's start may be behind; so may
        // one with a newer copy prepared here, whose decision may have been lost: the owner's
        // copy, which waits for that commit's apply (`behind`), with a page staged here
        // rebased on it (`read_fetched`). So is a page staged here with no copy behind it:
        // its owner may not know this node holds it. The owner reads its own; it is looked up
        // only in those cases (the read path usually pays for no lookup).
        let unconfirmed = self.protocol.is_unconfirmed(dataset, page);
        let mine = || self.protocol.owner_of(dataset, page) == self.protocol.id;
        let mut page_bytes = vec![0u8; PAGE_BYTES];
        let outcome = {
            let mut table = self.table();
            let through = (behind(unconfirmed, &table, key) || table.staged_without_copy(key))
                && !(table.is_staged(key) && mine());
            if through {
                ReadOutcome::Absent
            } else {
                table.read_for_kernel(key, &mut page_bytes)
            }
        };
        match outcome {
            ReadOutcome::Dirty | ReadOutcome::Persisted { .. } => {}
            // The owner without a copy: the page was never written.
            ReadOutcome::Absent if mine() => match self.protocol.owned_copy(dataset.id, page)? {
                Some((_, bytes)) => page_bytes = bytes,
                None => page_bytes.fill(0),
            },
            ReadOutcome::Absent => {
                let (version, bytes) = self.protocol.fetch(dataset, page)?;
                // The kernel's base is the bytes it gets, stored or not.
                let (_, served) = self
                    .table()
                    .read_fetched(key, version, bytes)
                    .map_err(pm_error)?;
                page_bytes = served;
            }
        }
        Ok(page_bytes)
    }

    fn write(&self, ino: Ino, dataset: &Dataset, offset: u64, data: &[u8]) -> Result<(), FsError> {
        self.protocol.note_cached(ino, dataset.id);
        let end = offset + data.len() as u64;
        // A page overwritten whole is not read by the kernel first: its base comes from its
        // owner now, as a read would (found by hotpot-sim: zeros written over a page this
        // node never read were lost, being no change from a zero base).
        // A stored copy its owner has not confirmed since this node's start is no base
        // either: it may miss a commit this node made as it stopped (found by hotpot-sim);
        // nor is one with a newer copy prepared here (`behind`).
        let pages = offset / PAGE_BYTES as u64..end.div_ceil(PAGE_BYTES as u64);
        for page in pages {
            self.settled_owner(dataset, page)?;
            let unconfirmed = self.protocol.is_unconfirmed(dataset, page);
            let based = {
                let table = self.table();
                table.has_kernel_base((dataset.id, page))
                    || (!behind(unconfirmed, &table, (dataset.id, page))
                        && table.has_base((dataset.id, page)))
            };
            if based {
                continue;
            }
            if self.protocol.owner_of(dataset, page) == self.protocol.id {
                self.protocol.owned_copy(dataset.id, page)?;
            } else {
                let (version, bytes) = self.protocol.fetch(dataset, page)?;
                self.table()
                    .serve_copy((dataset.id, page), version, &bytes)
                    .map_err(pm_error)?;
            }
        }
        let mut table = self.table();
        for (page, within, bytes) in page_pieces(offset, data.len()) {
            table
                .stage((dataset.id, page), within, &data[bytes])
                .map_err(pm_error)?;
        }
        Ok(())
    }

    /// Commit every page this node staged for `dataset`: a snapshot of the staged pages,
    /// grouped by chunk owner. MRSW: each owner's group is atomic, all owners at once; MRMW:
    /// three phases in node-id order. Pages of an owner that failed stay staged, the bytes
    /// sent kept for the next commit to send again, and the call fails.
    fn commit(&self, ino: Ino, dataset: &Dataset) -> Result<usize, FsError> {
        let _one_at_a_time = self.commit_lock.lock().expect("commit lock");
        self.protocol.note_record(dataset);
        self.protocol.settle_before_commit(dataset.id);
        let snapshots = StagedCommit::snapshot(&mut self.table(), dataset.id);
        let owner_of = |page| self.protocol.owner_of(dataset, page);
        let Some(staged) = StagedCommit::group(snapshots, dataset, owner_of) else {
            return Ok(0);
        };
        // An error does not tell a refusal from a commit in doubt: what was sent is kept
        // for resending either way (the program's own staged bytes).
        let result = crate::node::committer::commit(&self.protocol, dataset, ino, &staged.groups);
        if dataset.params.mode == Mode::Mrsw {
            self.protocol.writer_commit_ended(dataset.id);
        }
        let ended = match result {
            Ok(()) => Ended::Committed,
            Err(_) => Ended::Failed,
        };
        let stale = staged.stale_kernel_pages(dataset, ended);
        // Dropped from the kernel (a page dirty there written back first, against the base
        // it was read at) before the staged pages settle.
        if !stale.is_empty() {
            self.protocol.invalidate(ino, dataset.id, &stale);
        }
        staged.settle(&mut self.table(), dataset, ended);
        result.map(|()| staged.snapshots.len())
    }

    fn truncate(&self, dataset: DatasetId, size: u64) -> Result<(), FsError> {
        self.table().truncate(dataset, size).map_err(pm_error)
    }

    fn drop_dataset(&self, dataset: DatasetId) -> Result<(), FsError> {
        self.table().drop_dataset(dataset).map_err(pm_error)
    }

    fn usage(&self) -> PoolUsage {
        self.table().pool().usage()
    }

    fn attach_invalidator(&self, invalidator: Invalidator) {
        self.protocol.attach_invalidator(invalidator);
    }

    fn latest(&self, dataset: &Dataset) -> Result<u64, FsError> {
        self.protocol.latest_version(dataset)
    }

    fn pin(&self, view: ViewKey, dataset: &Dataset, version: u64) -> Result<(), FsError> {
        let mut pinned = Vec::new();
        for owner in self.owners(dataset) {
            let request = NodeRequest::Pin {
                view,
                dataset: dataset.clone(),
                version,
            };
            match ask(&self.protocol, owner, request) {
                Ok(_) => pinned.push(owner),
                Err(error) => {
                    self.unpin_at(view, &pinned);
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn unpin(&self, view: ViewKey, dataset: &Dataset) {
        let owners: Vec<NodeId> = self.owners(dataset).into_iter().collect();
        self.unpin_at(view, &owners);
    }

    fn read_at(
        &self,
        dataset: &Dataset,
        version: u64,
        pages: &[u64],
    ) -> Result<HashMap<u64, Vec<u8>>, FsError> {
        let mut by_owner: HashMap<NodeId, Vec<u64>> = HashMap::new();
        for page in pages {
            by_owner
                .entry(self.protocol.owner_of(dataset, *page))
                .or_default()
                .push(*page);
        }
        let mut got_pages = HashMap::new();
        for (owner, wanted) in by_owner {
            for batch in wanted.chunks(READ_AT_PAGES_MAX) {
                let request = NodeRequest::ReadAt {
                    dataset: dataset.id,
                    version,
                    pages: batch.to_vec(),
                };
                match ask(&self.protocol, owner, request)? {
                    NodeReply::Pages(got) if got.len() == batch.len() => {
                        for page in got {
                            got_pages.insert(page.page, page.bytes);
                        }
                    }
                    other => {
                        return Err(FsError::Io(format!(
                            "owner {owner} answered a read at version {version} with {other:?}"
                        )))
                    }
                }
            }
        }
        Ok(got_pages)
    }

    fn pinned_versions(&self, dataset: &Dataset) -> BTreeSet<u64> {
        let mut versions = BTreeSet::new();
        for owner in self.owners(dataset) {
            let request = NodeRequest::PinnedVersions {
                dataset: dataset.id,
            };
            if let Ok(NodeReply::Versions(pinned)) = ask(&self.protocol, owner, request) {
                versions.extend(pinned);
            }
        }
        versions
    }
}
