//! The cluster protocol on one node, in its three roles (docs/design.md, "Cluster protocol"):
//! owner (fetches, commits with prepare/decide to holders and replicas), holder/replica
//! (prepared copies, decisions, cache invalidation) and reader (fetch, failover to copies).
//! Must survive: a peer that dies at any step (typed errors become EIO, nothing is half
//! applied before the owner's decision), fetches racing commits (the owner's lock and holder
//! set change together), and its own writes arriving during a commit.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hotpot_core::page::{CommitError, OwnedPage, PageTable, TxKey};
use hotpot_core::pm::{PageKey, PmError, PAGE_BYTES};
use hotpot_core::proto::messages::{NodeReply, NodeRequest, PageWrite, VersionedPage};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, Ino, NodeId};
use hotpot_fs::Invalidator;
use hotpot_net::{multicall, Client, NetError};

use super::peers::Peers;

mod reader;

/// How long a fetch or a commit waits for a page another commit holds.
const LOCK_WAIT: Duration = Duration::from_secs(10);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct OwnerState {
    /// Pages in a commit: fetches and other commits of them wait.
    locked: HashMap<PageKey, TxKey>,
    /// Nodes holding a copy of each page this node owns (volatile, see design.md).
    holders: HashMap<PageKey, BTreeSet<NodeId>>,
}

pub struct Protocol {
    pub id: NodeId,
    pub table: Mutex<PageTable>,
    pub peers: Peers,
    owner: Mutex<OwnerState>,
    unlocked: Condvar,
    next_tx: AtomicU64,
    invalidator: OnceLock<Invalidator>,
    /// Set when this node started on a new PM file while datasets exist (a node lost with
    /// its PM and brought back): an owned page it lacks may have been written, so it looks
    /// for copies on the other nodes before it treats the page as never written.
    rebuilding: AtomicBool,
    /// Files whose pages the kernel of this node may cache; others need no invalidation.
    cached_inos: Mutex<HashSet<Ino>>,
}

pub fn pm_error(error: PmError) -> FsError {
    match error {
        PmError::Full { .. } | PmError::LogFull { .. } => FsError::NoSpace(error.to_string()),
        other => FsError::Io(other.to_string()),
    }
}

fn unreachable(error: &NetError) -> bool {
    matches!(
        error,
        NetError::Connect { .. } | NetError::Disconnected { .. } | NetError::Timeout { .. }
    )
}

/// Releases the pages of a commit at the owner however the commit ends.
pub(super) struct Unlock<'a> {
    protocol: &'a Protocol,
    tx: TxKey,
    keys: Vec<PageKey>,
    /// Unarmed: the locks outlive this call (an MRMW commit across owners keeps them until
    /// its phase 3).
    pub(super) armed: bool,
}

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.protocol.unlock_pages(self.tx, &self.keys);
        }
    }
}

impl Protocol {
    pub fn new(id: NodeId, table: PageTable, peers: Peers) -> Protocol {
        Protocol {
            id,
            table: Mutex::new(table),
            peers,
            owner: Mutex::new(OwnerState::default()),
            unlocked: Condvar::new(),
            next_tx: AtomicU64::new(1),
            invalidator: OnceLock::new(),
            rebuilding: AtomicBool::new(false),
            cached_inos: Mutex::new(HashSet::new()),
        }
    }

    /// A cluster-wide name for a new commit run by this node.
    pub fn next_tx(&self) -> TxKey {
        (self.id, self.next_tx.fetch_add(1, Ordering::Relaxed))
    }

    /// The kernel may now cache pages of `ino` on this node (it read or wrote them here).
    pub fn note_cached(&self, ino: Ino) {
        let mut cached = self.cached_inos.lock().expect("cached inos lock");
        if !cached.contains(&ino) {
            cached.insert(ino);
        }
    }

    pub fn set_rebuilding(&self) {
        self.rebuilding.store(true, Ordering::Relaxed);
    }

    /// This node's copy of a page it owns. A rebuilding owner without one takes the newest
    /// copy another node has (and keeps it); otherwise the page was never written.
    pub fn owned_copy(
        &self,
        dataset: DatasetId,
        page: u64,
    ) -> Result<Option<(u64, Vec<u8>)>, FsError> {
        if let Some(copy) = self.table().read_persisted((dataset, page)) {
            return Ok(Some(copy));
        }
        if !self.rebuilding.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let why = NetError::Disconnected {
            addr: "this node's own PM (new file)".into(),
        };
        match self.fetch_any_copy(dataset, page, self.id, &why) {
            Ok((version, bytes)) => {
                self.table()
                    .install_copy((dataset, page), version, &bytes)
                    .map_err(pm_error)?;
                Ok(Some((version, bytes)))
            }
            Err(_) => Ok(None),
        }
    }

    pub fn table(&self) -> MutexGuard<'_, PageTable> {
        self.table.lock().expect("page table lock")
    }

    fn owner_state(&self) -> MutexGuard<'_, OwnerState> {
        self.owner.lock().expect("owner state lock")
    }

    pub fn attach_invalidator(&self, invalidator: Invalidator) {
        let _ = self.invalidator.set(invalidator);
    }

    fn client(&self, node: NodeId) -> Result<Arc<Client>, FsError> {
        self.peers
            .client(node)
            .ok_or_else(|| FsError::Io(format!("node {node} is not known (not joined yet?)")))
    }

    fn call(&self, node: NodeId, request: &NodeRequest) -> Result<NodeReply, NetError> {
        let client = self.client(node).map_err(|_| NetError::Disconnected {
            addr: format!("node {node}"),
        })?;
        client.call(request, RPC_TIMEOUT)
    }

    /// Drop the kernel's cached pages of `ino` and wait until it has.
    /// Drop the kernel's cached pages of `ino` and wait until it has (a dirty one is
    /// written back first, against the base it was read at); then forget those bases.
    pub fn invalidate(&self, ino: Ino, dataset: DatasetId, pages: &[u64]) {
        let cached = self
            .cached_inos
            .lock()
            .expect("cached inos lock")
            .contains(&ino);
        if cached {
            if let Some(invalidator) = self.invalidator.get() {
                for page in pages {
                    invalidator.invalidate(ino, page * PAGE_BYTES as u64, PAGE_BYTES as u64);
                }
                invalidator.flush();
            }
        }
        let mut table = self.table();
        for page in pages {
            table.forget_served((dataset, *page));
        }
    }

    // ----- owner -----

    /// Take `keys` for commit `tx` (keys it already holds are kept). `wait`: wait, bounded,
    /// for other commits to finish (MRSW); otherwise a key held by another commit is refused
    /// at once with Busy (MRMW: the committer backs off and retries).
    pub(super) fn lock_pages(
        &self,
        tx: TxKey,
        keys: &[PageKey],
        wait: bool,
    ) -> Result<Unlock<'_>, FsError> {
        let deadline = Instant::now() + LOCK_WAIT;
        let mut state = self.owner_state();
        loop {
            let held = keys.iter().find_map(|key| {
                state
                    .locked
                    .get(key)
                    .filter(|holder| **holder != tx)
                    .map(|holder| (*key, *holder))
            });
            let Some((key, holder)) = held else { break };
            if !wait {
                return Err(FsError::Busy(format!(
                    "page {} of dataset {} is in commit {:?}",
                    key.1, key.0, holder
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FsError::Io(
                    "pages stayed locked by another commit for 10 s".into(),
                ));
            }
            state = self
                .unlocked
                .wait_timeout(state, left)
                .expect("owner state lock")
                .0;
        }
        for key in keys {
            state.locked.insert(*key, tx);
        }
        Ok(Unlock {
            protocol: self,
            tx,
            keys: keys.to_vec(),
            armed: true,
        })
    }

    /// Release the keys `tx` holds.
    pub(super) fn unlock_pages(&self, tx: TxKey, keys: &[PageKey]) {
        let mut state = self.owner_state();
        for key in keys {
            if state.locked.get(key) == Some(&tx) {
                state.locked.remove(key);
            }
        }
        drop(state);
        self.unlocked.notify_all();
    }

    fn holders_of(&self, keys: &[PageKey]) -> BTreeSet<NodeId> {
        let state = self.owner_state();
        keys.iter()
            .flat_map(|key| state.holders.get(key).into_iter().flatten().copied())
            .collect()
    }

    /// `Fetch` at the owner: the committed page; `from` becomes a holder. The holder set and
    /// the lock change under one mutex, so a commit either sees the new holder or finishes
    /// before the copy is read.
    pub fn serve_fetch(&self, dataset: DatasetId, page: u64, from: NodeId) -> NodeReply {
        let key = (dataset, page);
        let deadline = Instant::now() + LOCK_WAIT;
        let mut state = self.owner_state();
        while state.locked.contains_key(&key) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return NodeReply::Failed(FsError::Io(format!(
                    "page {page} stayed locked for 10 s"
                )));
            }
            state = self
                .unlocked
                .wait_timeout(state, left)
                .expect("owner state lock")
                .0;
        }
        state.holders.entry(key).or_default().insert(from);
        let copy = self.owned_copy(dataset, page);
        drop(state);
        match copy {
            Err(error) => NodeReply::Failed(error),
            Ok(Some((version, bytes))) => NodeReply::Page(VersionedPage {
                page,
                version,
                bytes,
            }),
            Ok(None) => NodeReply::Page(VersionedPage {
                page,
                version: 0,
                bytes: Vec::new(),
            }),
        }
    }

    /// The nodes that must hold the new bytes: every live holder, the committer, and more
    /// live nodes (in id order after this one) until `min(replicas, live)` copies exist.
    fn targets(
        &self,
        dataset: &Dataset,
        holders: BTreeSet<NodeId>,
        committer: NodeId,
    ) -> (Vec<NodeId>, usize) {
        let live = self.peers.live();
        let copies = usize::from(dataset.params.replicas.max(1)).min(live.len().max(1));
        let need = copies - 1;
        let mut targets: BTreeSet<NodeId> = holders
            .into_iter()
            .chain(std::iter::once(committer))
            .filter(|node| *node != self.id && live.contains(node))
            .collect();
        let after = live.iter().filter(|node| **node > self.id);
        let before = live.iter().filter(|node| **node < self.id);
        for node in after.chain(before) {
            if targets.len() >= need {
                break;
            }
            targets.insert(*node);
        }
        (targets.into_iter().collect(), need)
    }

    /// A commit at the owner (design.md, steps 1–6). Returns the new versions.
    pub fn owner_commit(
        &self,
        dataset: &Dataset,
        ino: Ino,
        committer: NodeId,
        committer_prepared: bool,
        pages: &[PageWrite],
    ) -> Result<Vec<u64>, FsError> {
        let tx = self.next_tx();
        let keys: Vec<PageKey> = pages.iter().map(|write| (dataset.id, write.page)).collect();
        let _unlock = self.lock_pages(tx, &keys, true)?;
        self.commit_locked(tx, dataset, ino, committer, committer_prepared, pages)
    }

    /// Steps 2–6 of a commit whose pages `tx` holds: targets, Prepare, the local apply (the
    /// decision), Decide, holders. Returns the new versions.
    pub(super) fn commit_locked(
        &self,
        tx: TxKey,
        dataset: &Dataset,
        ino: Ino,
        committer: NodeId,
        committer_prepared: bool,
        pages: &[PageWrite],
    ) -> Result<Vec<u64>, FsError> {
        let keys: Vec<PageKey> = pages.iter().map(|write| (dataset.id, write.page)).collect();
        let holders = self.holders_of(&keys);
        let (targets, need) = self.targets(dataset, holders, committer);
        if targets.len() < need {
            return Err(FsError::Io(format!(
                "dataset {} needs {} copies but only {} nodes are live",
                dataset.id,
                need + 1,
                targets.len() + 1
            )));
        }
        // Copies count from every target; messages go to those without a copy prepared.
        let counted = targets.clone();
        let targets: Vec<NodeId> = targets
            .into_iter()
            .filter(|node| !(committer_prepared && *node == committer))
            .collect();
        for write in pages {
            self.owned_copy(dataset.id, write.page)?;
        }
        // Versions the commit will produce; the local apply checks the bases again.
        let table_versions: Vec<u64> = {
            let table = self.table();
            keys.iter().map(|key| table.version_of(*key)).collect()
        };
        for (write, current) in pages.iter().zip(&table_versions) {
            if write.base_version != *current {
                return Err(stale(dataset.id, write.page, write.base_version, *current));
            }
        }
        let copies: Vec<VersionedPage> = pages
            .iter()
            .map(|write| VersionedPage {
                page: write.page,
                version: write.base_version + 1,
                bytes: write.bytes.clone(),
            })
            .collect();
        self.prepare_targets(tx, dataset.id, committer, &targets, copies)?;
        let owned: Vec<OwnedPage<'_>> = pages
            .iter()
            .map(|write| OwnedPage {
                page: write.page,
                base_version: write.base_version,
                bytes: &write.bytes,
            })
            .collect();
        let applied = self.table().apply_owned(dataset.id, &owned);
        let versions = match applied {
            Ok(versions) => versions,
            Err(error) => {
                self.send_to(&targets, &NodeRequest::Abort { tx });
                return Err(match error {
                    CommitError::Stale {
                        page,
                        base,
                        current,
                    } => stale(dataset.id, page, base, current),
                    CommitError::Pm(error) => pm_error(error),
                    CommitError::BadRuns { page, reason } => {
                        FsError::Invalid(format!("page {page}: {reason}"))
                    }
                });
            }
        };
        // The commit is decided here. Holders learn it before the committer's msync returns.
        if committer != self.id {
            self.invalidate(
                ino,
                dataset.id,
                &pages.iter().map(|write| write.page).collect::<Vec<_>>(),
            );
        }
        for node in &targets {
            let request = NodeRequest::Decide {
                tx,
                ino: (*node != committer).then_some(ino),
            };
            if let Err(error) = self.call(*node, &request) {
                tracing::warn!(node, %error, "a target missed the decision; its prepared copy waits for recovery");
            }
        }
        let mut state = self.owner_state();
        for key in &keys {
            state
                .holders
                .entry(*key)
                .or_default()
                .extend(counted.iter().copied());
        }
        Ok(versions)
    }

    fn prepare_targets(
        &self,
        tx: TxKey,
        dataset: DatasetId,
        committer: NodeId,
        targets: &[NodeId],
        copies: Vec<VersionedPage>,
    ) -> Result<(), FsError> {
        if targets.is_empty() {
            return Ok(());
        }
        let clients: Vec<Arc<Client>> = targets
            .iter()
            .map(|node| self.client(*node))
            .collect::<Result<_, _>>()?;
        // The committer gets the same message; it is the one that reads the copy locally.
        let mut results = Vec::with_capacity(targets.len());
        let plain = NodeRequest::Prepare {
            tx,
            dataset,
            committer: false,
            pages: copies.clone(),
        };
        let for_committer = NodeRequest::Prepare {
            tx,
            dataset,
            committer: true,
            pages: copies,
        };
        let request_for = |node: &NodeId| {
            if *node == committer {
                &for_committer
            } else {
                &plain
            }
        };
        if let ([node], [client]) = (targets, clients.as_slice()) {
            // One target (replicas 2): no thread to start.
            results.push(client.call::<_, NodeReply>(request_for(node), RPC_TIMEOUT));
        } else {
            std::thread::scope(|scope| {
                let calls: Vec<_> = targets
                    .iter()
                    .zip(&clients)
                    .map(|(node, client)| {
                        let request = request_for(node);
                        scope.spawn(move || client.call::<_, NodeReply>(request, RPC_TIMEOUT))
                    })
                    .collect();
                for call in calls {
                    results.push(call.join().expect("prepare thread"));
                }
            });
        }
        let failed: Vec<String> = targets
            .iter()
            .zip(&results)
            .filter_map(|(node, result)| match result {
                Ok(NodeReply::Done) => None,
                Ok(NodeReply::Failed(error)) => Some(format!("node {node}: {error}")),
                Ok(other) => Some(format!("node {node}: unexpected {other:?}")),
                Err(error) => Some(format!("node {node}: {error}")),
            })
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        self.send_to(targets, &NodeRequest::Abort { tx });
        Err(FsError::Io(format!(
            "commit not replicated, nothing applied: {}",
            failed.join("; ")
        )))
    }

    fn send_to(&self, nodes: &[NodeId], request: &NodeRequest) {
        let clients: Vec<Arc<Client>> = nodes
            .iter()
            .filter_map(|node| self.peers.client(*node))
            .collect();
        for result in multicall::<_, NodeReply>(&clients, request, RPC_TIMEOUT) {
            if let Err(error) = result {
                tracing::warn!(%error, ?request, "peer did not answer");
            }
        }
    }

    // ----- holder / replica -----

    pub fn serve_prepare(
        &self,
        tx: TxKey,
        dataset: DatasetId,
        committer: bool,
        pages: &[VersionedPage],
    ) -> NodeReply {
        let borrowed: Vec<(u64, u64, &[u8])> = pages
            .iter()
            .map(|copy| (copy.page, copy.version, copy.bytes.as_slice()))
            .collect();
        match self
            .table()
            .prepare_copies(tx, dataset, &borrowed, committer)
        {
            Ok(()) => NodeReply::Done,
            Err(error) => NodeReply::Failed(pm_error(error)),
        }
    }

    pub fn serve_decide(&self, tx: TxKey, ino: Option<Ino>) -> NodeReply {
        let decided = self.table().decide_copies(tx);
        match (decided, ino) {
            (Some((dataset, pages)), Some(ino)) => self.invalidate(ino, dataset, &pages),
            // The committer: its kernel holds the committed bytes; the base moves with them.
            (Some((dataset, pages)), None) => {
                let mut table = self.table();
                for page in pages {
                    table.serve_committed((dataset, page));
                }
            }
            (None, _) => {}
        }
        NodeReply::Done
    }

    pub fn serve_abort(&self, tx: TxKey) -> NodeReply {
        self.table().abort_copies(tx);
        NodeReply::Done
    }
}

fn stale(dataset: DatasetId, page: u64, base: u64, current: u64) -> FsError {
    FsError::Io(format!(
        "page {page} of dataset {dataset} was written against version {base} but is at {current}: \
         another node committed it (MRSW needs a single writer; MRMW merging is not built yet)"
    ))
}
