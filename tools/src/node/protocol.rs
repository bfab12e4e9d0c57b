//! The cluster protocol on one node, in its three roles (docs/design.md, "Cluster protocol"):
//! owner (fetches, commits with prepare/decide to holders and replicas), holder/replica
//! (prepared copies, decisions, cache invalidation) and reader (fetch, failover to copies).
//! Must survive: a peer that dies at any step (typed errors become EIO, nothing is half
//! applied before the owner's decision), fetches racing commits (the owner's lock and holder
//! set change together), and its own writes arriving during a commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hotpot_core::page::{CommitError, Decided, OwnedPage, PageTable, TxKey};
use hotpot_core::pm::{PageKey, PmError, TxRole, TxTag, PAGE_BYTES};
use hotpot_core::proto::copies::{CopyBook, Reached};
use hotpot_core::proto::deciders::{Decider, Deciders};
use hotpot_core::proto::locks::PageLocks;
use hotpot_core::proto::messages::{NodeReply, NodeRequest, PageWrite, VersionedPage};
use hotpot_core::proto::outcome::GivenUp;
use hotpot_core::proto::rejoin::Incarnations;
use hotpot_core::proto::replication::{short_of_copies, targets, Targets};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, Ino, Mode, NodeId, NodeInfo};
use hotpot_core::proto::unconfirmed::Unconfirmed;
use hotpot_fs::Invalidator;
use hotpot_net::{multicall, Client, NetError};

use super::fault;
use super::peers::Peers;

mod reader;

/// How long a fetch or a commit waits for a page another commit holds.
const LOCK_WAIT: Duration = Duration::from_secs(10);
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long owner requests wait for a restarting node to finish rejoining.
const READY_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(super) struct OwnerState {
    /// Pages in a commit, and whether this owner has applied it (proto/locks.rs): other
    /// commits of a locked page wait, fetches only until it is applied, so a reader whose
    /// kernel blocks the commit's cache invalidation on this very fetch does not stall the
    /// commit (design.md, step 5).
    locks: PageLocks,
    /// Holders, current and behind copies of each page this node owns (proto/copies.rs).
    pub(super) copies: CopyBook,
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
    /// The file of each dataset this node's kernel may cache (copies installed outside a
    /// commit's Decide drop those pages through it).
    ino_of: Mutex<HashMap<DatasetId, Ino>>,
    /// As a leader: commits this node promised never to decide (a follower asked for their
    /// outcome first). Held while the leader decides, so the two cannot interleave.
    pub(super) aborted: Mutex<GivenUp>,
    /// How many times each node had joined, by the last heartbeat's view: a higher number
    /// means it restarted since (`take_view`).
    incarnations: Mutex<Incarnations>,
    /// Owners seen restarting whose pages' copies here are not marked yet: the resolver
    /// marks them (recovery.rs `owners_restarted`), off the heartbeat thread, which must
    /// never wait on the dispatcher.
    pub(super) restarted_owners: Mutex<BTreeSet<NodeId>>,
    /// As an MRMW leader: pages locked in phase 1, by commit, and since when.
    pub(super) phase1_locks: Mutex<HashMap<TxKey, (Vec<PageKey>, Instant)>>,
    /// As a follower owner: multi-owner commits prepared here, waiting for the decision.
    pub(super) followers: Mutex<HashMap<TxKey, super::multi::FollowerTx>>,
    /// As a holder or replica: who decides each prepared copy, and the multi-owner commits
    /// this node decided copies of (a leader that lost its PM asks for them).
    deciders: Mutex<Deciders>,
    /// Followers' confirmations to send to leaders (see multi.rs).
    pub(super) confirmations: crossbeam_channel::Sender<(NodeId, TxKey)>,
    confirm_queue: crossbeam_channel::Receiver<(NodeId, TxKey)>,
    /// Numbers for `hotpot status` (recovery.rs).
    pub(super) rejoin_ms: AtomicU64,
    pub(super) below_copies: AtomicU64,
    pub(super) rereplicated: AtomicU64,
    /// A node rejoined (it may have lost copies): re-replicate at the next round.
    pub(super) rereplicate_soon: AtomicBool,
    /// Pages this node took from another node while their owner did not answer, and the
    /// owner: it does not know this node holds them until it is asked again (reader.rs).
    pub(super) failed_over: Mutex<BTreeMap<PageKey, NodeId>>,
    /// Owners (per dataset) that have not confirmed this node's copies of their pages
    /// (`proto/unconfirmed.rs`, the node machine's book too): the owner did not answer the
    /// rejoin's registration in time (recovery.rs), restarted (`owners_restarted`), or a
    /// copy prepared here was dropped at its decision (`copies_behind`). Such a copy may
    /// miss a commit, so until the owner confirms, reads and writes of those pages go to
    /// the owner as if it were not here.
    pub(super) unconfirmed: Mutex<Unconfirmed>,
    /// False while the node rejoins (recovery.rs): owner requests wait.
    ready: Mutex<bool>,
    became_ready: Condvar,
    /// How pages came from their owners (reader.rs).
    pub(super) fetches: reader::FetchCounters,
    /// Dataset versions this node hands out (as an MRMW home or an MRSW writer), and the
    /// leases of pins (versions.rs).
    pub(super) published: super::versions::Published,
    /// The identical-page merger's numbers (merger.rs).
    pub(super) merging: super::merger::MergeCounters,
    /// Dataset records (fixed at creation) this node looked up, for the owner check of
    /// requests that name a dataset by id.
    records: Mutex<HashMap<DatasetId, Dataset>>,
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
        // Commit names must not repeat across restarts (a leader keeps outcomes by name):
        // the sequence starts at the start time in microseconds.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_micros() as u64)
            .unwrap_or(1);
        let (confirmations, confirm_queue) = crossbeam_channel::unbounded();
        Protocol {
            id,
            table: Mutex::new(table),
            peers,
            owner: Mutex::new(OwnerState::default()),
            unlocked: Condvar::new(),
            next_tx: AtomicU64::new(start),
            invalidator: OnceLock::new(),
            rebuilding: AtomicBool::new(false),
            cached_inos: Mutex::new(HashSet::new()),
            ino_of: Mutex::new(HashMap::new()),
            aborted: Mutex::new(GivenUp::default()),
            incarnations: Mutex::new(Incarnations::default()),
            restarted_owners: Mutex::new(BTreeSet::new()),
            followers: Mutex::new(HashMap::new()),
            phase1_locks: Mutex::new(HashMap::new()),
            deciders: Mutex::new(Deciders::default()),
            confirmations,
            confirm_queue,
            rejoin_ms: AtomicU64::new(0),
            below_copies: AtomicU64::new(0),
            rereplicated: AtomicU64::new(0),
            rereplicate_soon: AtomicBool::new(false),
            failed_over: Mutex::new(BTreeMap::new()),
            unconfirmed: Mutex::new(Unconfirmed::default()),
            ready: Mutex::new(false),
            became_ready: Condvar::new(),
            fetches: reader::FetchCounters::default(),
            published: Default::default(),
            merging: Default::default(),
            records: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn confirm_queue(&self) -> &crossbeam_channel::Receiver<(NodeId, TxKey)> {
        &self.confirm_queue
    }

    /// The node has rejoined: owner requests proceed.
    pub fn set_ready(&self) {
        self.set_ready_to(true);
    }

    /// `false`: owner requests wait (a take-over is running).
    pub(super) fn set_ready_to(&self, ready: bool) {
        *self.ready.lock().expect("ready lock") = ready;
        if ready {
            self.became_ready.notify_all();
        }
    }

    /// What `hotpot status` shows of this node's recovery.
    pub fn recovery_status(&self) -> hotpot_core::proto::types::RecoveryStatus {
        let (waiting, outcomes) = {
            let table = self.table();
            (table.pending().len(), table.outcomes_waiting().len())
        };
        hotpot_core::proto::types::RecoveryStatus {
            state: if self.is_ready() {
                "ready"
            } else {
                "rejoining"
            }
            .to_string(),
            rebuilt: self.is_rebuilding(),
            rejoin_ms: self.rejoin_ms.load(Ordering::Relaxed),
            commits_waiting: waiting as u64,
            outcomes_kept: outcomes as u64,
            pages_below_copies: self.below_copies.load(Ordering::Relaxed),
            pages_rereplicated: self.rereplicated.load(Ordering::Relaxed),
            unconfirmed_by: self.unconfirmed_by(),
        }
    }

    pub(super) fn is_ready(&self) -> bool {
        *self.ready.lock().expect("ready lock")
    }

    /// Owner requests wait (bounded) until the node has rejoined.
    pub(super) fn wait_ready(&self) -> Result<(), FsError> {
        let ready = self.ready.lock().expect("ready lock");
        let (ready, _) = self
            .became_ready
            .wait_timeout_while(ready, READY_WAIT, |ready| !*ready)
            .expect("ready lock");
        if *ready {
            Ok(())
        } else {
            Err(FsError::Io(format!(
                "node {} is still rejoining the cluster",
                self.id
            )))
        }
    }

    /// The owner of `page` now: its chunk's owner, or the node promoted in its place.
    pub fn owner_of(&self, dataset: &Dataset, page: u64) -> NodeId {
        self.peers.resolve(dataset.owner_of_page(page))
    }

    /// The dispatcher's view: who is live, and who was promoted in place of whom. A node
    /// that gains chunks serves as no owner from this moment until its take-over is over
    /// (the resolver runs it): before, it would have answered for pages it never adopted
    /// (found by hotpot-sim: a reader got the successor's older copy). A node that joined
    /// again since the last view is noted for the resolver (`restarted_owners`).
    pub(super) fn take_view(&self, nodes: &[NodeInfo], successors: BTreeMap<NodeId, NodeId>) {
        let known = self.peers.successors();
        let gains = successors
            .iter()
            .any(|(lost, by)| *by == self.id && known.get(lost) != Some(by));
        if gains {
            self.set_ready_to(false);
        }
        self.peers.update(nodes, successors);
        self.unconfirmed
            .lock()
            .expect("unconfirmed lock")
            .follow_promotions(self.id, |node| self.peers.resolve(node));
        let restarted = self
            .incarnations
            .lock()
            .expect("incarnations lock")
            .restarted(
                self.id,
                nodes.iter().map(|node| (node.id, node.incarnation)),
            );
        self.restarted_owners
            .lock()
            .expect("restarted owners lock")
            .extend(restarted);
    }

    /// Requests for pages this node does not own by its own view are refused as busy: the
    /// asker's view of the promotions is newer or older, and it asks again.
    pub(super) fn check_owner(
        &self,
        dataset: &Dataset,
        pages: impl IntoIterator<Item = u64>,
    ) -> Result<(), FsError> {
        match pages
            .into_iter()
            .find(|page| self.owner_of(dataset, *page) != self.id)
        {
            None => Ok(()),
            Some(page) => Err(FsError::Busy(format!(
                "node {} does not own page {page} of dataset {} (its view of the owners may be older or newer than the asker's)",
                self.id, dataset.id
            ))),
        }
    }

    /// `check_owner` for a request naming its dataset by id (`Fetch`, `Locate`, `ReadAt`). Nothing
    /// to check while nobody was promoted: every node then computes the same owners.
    pub(super) fn check_owner_of(&self, dataset: DatasetId, page: u64) -> Result<(), FsError> {
        if self.peers.successors().is_empty() {
            return Ok(());
        }
        let record = self.dataset_record(dataset)?;
        self.check_owner(&record, [page])
    }

    /// The record of `dataset` (fixed at creation): looked up once, from the dispatcher.
    pub(super) fn dataset_record(&self, dataset: DatasetId) -> Result<Dataset, FsError> {
        let known = self
            .records
            .lock()
            .expect("records lock")
            .get(&dataset)
            .cloned();
        match known {
            Some(record) => Ok(record),
            None => {
                let records = self.datasets()?;
                let mut cache = self.records.lock().expect("records lock");
                cache.extend(records.into_iter().map(|record| (record.id, record)));
                cache.get(&dataset).cloned().ok_or(FsError::NotFound)
            }
        }
    }

    /// `dataset`'s record, which this node's program holds (a commit notes it before it
    /// starts, so its decision finds the dataset's mode without asking anyone).
    pub fn note_record(&self, dataset: &Dataset) {
        self.records
            .lock()
            .expect("records lock")
            .entry(dataset.id)
            .or_insert_with(|| dataset.clone());
    }

    /// `dataset`'s mode, if its record is here (never asks the dispatcher).
    fn known_mode(&self, dataset: DatasetId) -> Option<Mode> {
        let records = self.records.lock().expect("records lock");
        records.get(&dataset).map(|record| record.params.mode)
    }

    pub fn is_rebuilding(&self) -> bool {
        self.rebuilding.load(Ordering::Relaxed)
    }

    /// A cluster-wide name for a new commit run by this node.
    pub fn next_tx(&self) -> TxKey {
        (self.id, self.next_tx.fetch_add(1, Ordering::Relaxed))
    }

    /// The kernel may now cache pages of `ino` on this node (it read or wrote them here).
    pub fn note_cached(&self, ino: Ino, dataset: DatasetId) {
        let mut cached = self.cached_inos.lock().expect("cached inos lock");
        if !cached.contains(&ino) {
            cached.insert(ino);
            self.ino_of
                .lock()
                .expect("ino map lock")
                .insert(dataset, ino);
        }
    }

    /// Drop this node's cached copies of `pages` of `dataset`, whatever file shows them.
    pub(super) fn invalidate_dataset(&self, dataset: DatasetId, pages: &[u64]) {
        let ino = self
            .ino_of
            .lock()
            .expect("ino map lock")
            .get(&dataset)
            .copied();
        match ino {
            Some(ino) => self.invalidate(ino, dataset, pages),
            None => {
                let mut table = self.table();
                for page in pages {
                    table.forget_served((dataset, *page));
                }
            }
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

    /// Drop the kernel's cached pages of `ino` and wait until it has (a dirty one is
    /// written back first, against the base it was read at); then forget those bases, but
    /// not one served while the kernel was dropping them: a program's fault may read a page
    /// again at once, and that copy stays in the kernel with its base.
    pub fn invalidate(&self, ino: Ino, dataset: DatasetId, pages: &[u64]) {
        let mark = self.table().served_mark();
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
            table.forget_served_before((dataset, *page), mark);
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
        while let Some((key, holder)) = state.locks.held_by_other(tx, keys) {
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
        state.locks.take(tx, keys);
        Ok(Unlock {
            protocol: self,
            tx,
            keys: keys.to_vec(),
            armed: true,
        })
    }

    /// Release the keys `tx` holds.
    pub(super) fn unlock_pages(&self, tx: TxKey, keys: &[PageKey]) {
        self.owner_state().locks.release(tx, keys);
        self.unlocked.notify_all();
    }

    /// What this owner knows of the other nodes' copies of its pages, changed under the
    /// owner state's lock (proto/copies.rs).
    pub(super) fn copies<T>(&self, change: impl FnOnce(&mut CopyBook) -> T) -> T {
        change(&mut self.owner_state().copies)
    }

    /// `copies`, and `keys` (locked by the caller) read as final by fetches from now until
    /// they are unlocked, as if a commit had been applied: the lock changes no copy here.
    pub(super) fn copies_final<T>(
        &self,
        keys: &[PageKey],
        change: impl FnOnce(&mut CopyBook) -> T,
    ) -> T {
        let mut state = self.owner_state();
        state.locks.applied(keys);
        let changed = change(&mut state.copies);
        drop(state);
        self.unlocked.notify_all();
        changed
    }

    /// `Fetch` at the owner: the committed page; `from` becomes a holder. The holder set and
    /// the lock change under one mutex, so a commit either sees the new holder or finishes
    /// before the copy is read.
    pub fn serve_fetch(&self, dataset: DatasetId, page: u64, from: NodeId) -> NodeReply {
        if let Err(error) = self
            .wait_ready()
            .and_then(|()| self.check_owner_of(dataset, page))
        {
            return NodeReply::Failed(error);
        }
        match self.register_holder((dataset, page), from, None) {
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

    /// `Locate` at the owner: where its committed copy lies in its PM, for a one-sided read;
    /// `from` becomes a holder exactly as with `Fetch`.
    pub fn serve_locate(&self, dataset: DatasetId, page: u64, from: NodeId) -> NodeReply {
        if let Err(error) = self
            .wait_ready()
            .and_then(|()| self.check_owner_of(dataset, page))
        {
            return NodeReply::Failed(error);
        }
        let key = (dataset, page);
        match self.register_holder_then(key, from, |_| self.table().locate_persisted(key)) {
            Ok(location) => NodeReply::Located(location),
            Err(error) => NodeReply::Failed(error),
        }
    }

    /// Wait (bounded) until no commit holds `key`, make `from` a holder and read this
    /// owner's copy, under one lock: a commit either sees the new holder or finishes before
    /// the copy is read. `listed`: the version `from` says it holds; at this owner's, its
    /// copy counts as current (a fetch's answer does not count: it may be lost).
    pub(super) fn register_holder(
        &self,
        key: PageKey,
        from: NodeId,
        listed: Option<u64>,
    ) -> Result<Option<(u64, Vec<u8>)>, FsError> {
        self.register_holder_then(key, from, |copies| {
            let copy = self.owned_copy(key.0, key.1)?;
            if let (Some((mine, _)), Some(version)) = (&copy, listed) {
                if *mine == version {
                    copies.has_current(key, from);
                }
            }
            Ok(copy)
        })?
    }

    /// `register_holder`, with `read` run under the same lock.
    fn register_holder_then<T>(
        &self,
        key: PageKey,
        from: NodeId,
        read: impl FnOnce(&mut CopyBook) -> T,
    ) -> Result<T, FsError> {
        if from != self.id {
            self.peers.mark_live(from);
        }
        let mut state = self.settled(&[key])?;
        state.copies.sending(key, from);
        Ok(read(&mut state.copies))
    }

    /// The owner state once no commit this owner has not applied holds any of `keys`
    /// (bounded wait): their current copies are final for every decided commit.
    pub(super) fn settled(&self, keys: &[PageKey]) -> Result<MutexGuard<'_, OwnerState>, FsError> {
        let deadline = Instant::now() + LOCK_WAIT;
        let mut state = self.owner_state();
        while let Some(key) = state.locks.unsettled(keys) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FsError::Io(format!(
                    "page {} stayed locked for 10 s",
                    key.1
                )));
            }
            state = self
                .unlocked
                .wait_timeout(state, left)
                .expect("owner state lock")
                .0;
        }
        Ok(state)
    }

    /// Whether a commit holds any of `keys` here.
    pub(super) fn holds_any(&self, keys: &[PageKey]) -> bool {
        let state = self.owner_state();
        state.locks.holds_any(keys)
    }

    /// A commit at the owner (design.md, steps 1–6).
    #[allow(clippy::too_many_arguments)]
    pub fn owner_commit(
        &self,
        tx: TxKey,
        followers: &[NodeId],
        dataset: &Dataset,
        ino: Ino,
        (committer, committer_prepared): (NodeId, bool),
        pages: &[PageWrite],
        version: Option<u64>,
    ) -> Result<Applied, FsError> {
        self.wait_ready()?;
        self.check_owner(dataset, pages.iter().map(|write| write.page))?;
        let keys: Vec<PageKey> = pages.iter().map(|write| (dataset.id, write.page)).collect();
        let _unlock = self.lock_pages(tx, &keys, true)?;
        self.commit_locked(
            tx,
            followers,
            dataset,
            ino,
            (committer, committer_prepared),
            pages,
            version,
        )
    }

    /// Steps 2–6 of a commit whose pages `tx` holds: targets, Prepare, the dataset version
    /// (`version`, the MRSW writer's, or the home's), the local apply (the decision), Decide,
    /// holders. Returns the new page versions and the dataset version, in doubt when fewer
    /// than the wanted copies confirmed the decision. With `followers`, this owner leads a
    /// multi-owner commit: its apply decides the whole commit and keeps the outcome.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn commit_locked(
        &self,
        tx: TxKey,
        followers: &[NodeId],
        dataset: &Dataset,
        ino: Ino,
        (committer, committer_prepared): (NodeId, bool),
        pages: &[PageWrite],
        version: Option<u64>,
    ) -> Result<Applied, FsError> {
        let commit = (!followers.is_empty()).then_some((tx, self.id));
        let replicated = self.replicate(dataset, committer, committer_prepared, pages, commit)?;
        fault::point("owner.targets_prepared");
        let owned: Vec<OwnedPage<'_>> = pages
            .iter()
            .map(|write| OwnedPage {
                page: write.page,
                base_version: write.base_version,
                bytes: &write.bytes,
            })
            .collect();
        let tag = if followers.is_empty() {
            TxTag::default()
        } else {
            // The leader waits for itself too: its own targets must have decided before the
            // outcome may be forgotten.
            let mut participants = followers.to_vec();
            participants.push(self.id);
            // A committer that persisted its own copy and owns none of these pages waits
            // for the outcome too, if it misses this answer: it confirms for that copy.
            if committer_prepared && !participants.contains(&committer) {
                participants.push(committer);
            }
            TxTag {
                role: TxRole::Leader,
                tx,
                leader: self.id,
                participants: TxTag::bitmap(&participants).ok_or_else(|| {
                    FsError::Invalid("multi-owner commits need node ids 1..=64".into())
                })?,
            }
        };
        // Every page is locked: the version orders this commit after every earlier one of
        // these pages (docs/design.md, "Dataset versions").
        let dataset_version = version.map_or_else(|| self.next_version(dataset), Ok);
        let page_ids: Vec<u64> = pages.iter().map(|write| write.page).collect();
        let applied = {
            let aborted = self.aborted.lock().expect("aborted lock");
            if aborted.contains(tx) {
                Err(FsError::Io(format!(
                    "commit {tx:?} was already given up by its followers (it took too long)"
                )))
            } else if let Err(error) = &dataset_version {
                Err(error.clone())
            } else {
                let dataset_version = *dataset_version.as_ref().expect("checked above");
                let mut table = self.table();
                let kept = table.keep_for_views(dataset.id, &page_ids, dataset_version);
                let applied = table.apply_owned(dataset.id, &owned, tag);
                table.settle_for_views(kept, applied.is_ok());
                applied.map_err(|error| match error {
                    CommitError::Stale {
                        page,
                        base,
                        current,
                    } => stale(dataset.id, page, base, current),
                    CommitError::Pm(error) => pm_error(error),
                    CommitError::BadRuns { page, reason } => {
                        FsError::Invalid(format!("page {page}: {reason}"))
                    }
                })
            }
        };
        let versions = match applied {
            Ok(versions) => versions,
            Err(error) => {
                let abort = NodeRequest::Abort {
                    tx: replicated.target_tx,
                };
                self.send_to(&replicated.targets, &abort);
                return Err(error);
            }
        };
        // The commit is decided here.
        fault::point("owner.decided");
        let delivered = self.announce(dataset.id, ino, committer, &page_ids, &replicated);
        if delivered == replicated.targets.len() && !followers.is_empty() {
            self.table().confirm_outcome(tx, self.id);
        }
        fault::point("owner.announced");
        Ok(Applied {
            versions,
            dataset_version: dataset_version?,
            in_doubt: replicated.short_of_copies(delivered),
        })
    }

    /// Steps 2–3 of a commit at an owner: choose the targets, check the bases, persist the
    /// new copies at every target as Prepared records.
    /// `commit`: the multi-owner commit and its leader, when there is one.
    pub(super) fn replicate(
        &self,
        dataset: &Dataset,
        committer: NodeId,
        committer_prepared: bool,
        pages: &[PageWrite],
        commit: Option<(TxKey, NodeId)>,
    ) -> Result<Replicated, FsError> {
        let keys: Vec<PageKey> = pages.iter().map(|write| (dataset.id, write.page)).collect();
        let live: BTreeSet<NodeId> = self.peers.live().into_iter().collect();
        let holders = self.copies(|copies| copies.holders_of(&keys));
        // Holders not live are left out (`skipped`): their copies fall behind this commit.
        // Copies count from every target; messages go to those without a copy prepared.
        let Targets {
            nodes,
            asked,
            skipped,
            wanted,
        } = targets(
            self.id,
            dataset.params.replicas,
            &live,
            &holders,
            (committer, committer_prepared),
        );
        let live_targets = nodes.iter().filter(|node| live.contains(node)).count();
        if live_targets + 1 < wanted {
            return Err(FsError::Io(format!(
                "dataset {} needs {wanted} copies but only {} nodes are live",
                dataset.id,
                live_targets + 1
            )));
        }
        for write in pages {
            self.owned_copy(dataset.id, write.page)?;
        }
        let table_versions: Vec<u64> = {
            let table = self.table();
            keys.iter().map(|key| table.version_of(*key)).collect()
        };
        for (write, current) in pages.iter().zip(&table_versions) {
            if write.base_version != *current {
                return Err(stale(dataset.id, write.page, write.base_version, *current));
            }
        }
        let copies: Vec<VersionedPage> = pages.iter().map(PageWrite::next_copy).collect();
        // Targets know the copies under this owner's own name for them: one commit across
        // owners reaches a node from several owners, and each set is decided by its owner.
        let target_tx = self.next_tx();
        self.prepare_targets(target_tx, commit, dataset.id, committer, &asked, copies)?;
        Ok(Replicated {
            target_tx,
            targets: asked,
            counted: nodes,
            skipped,
            keys,
            wanted,
        })
    }

    /// Step 5–6 after the decision: the committer's kernel keeps its pages, every other
    /// node's cached copies go (here first), targets decide, holders are recorded. Returns
    /// how many targets got the decision.
    pub(super) fn announce(
        &self,
        dataset: DatasetId,
        ino: Ino,
        committer: NodeId,
        pages: &[u64],
        replicated: &Replicated,
    ) -> usize {
        self.owner_state().locks.applied(&replicated.keys);
        self.unlocked.notify_all();
        if committer != self.id {
            self.invalidate(ino, dataset, pages);
        }
        let decide = |node: &NodeId| NodeRequest::Decide {
            tx: replicated.target_tx,
            ino: (*node != committer).then_some(ino),
        };
        let delivered = |node: &NodeId, result: Result<NodeReply, NetError>| match result {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(node, %error, "a target missed the decision; it will ask");
                false
            }
        };
        let mut decided: BTreeSet<NodeId> = if let [node] = replicated.targets.as_slice() {
            let call = self.call(*node, &decide(node));
            delivered(node, call).then_some(*node).into_iter().collect()
        } else {
            std::thread::scope(|scope| {
                let calls: Vec<_> = replicated
                    .targets
                    .iter()
                    .map(|node| {
                        let request = decide(node);
                        (node, scope.spawn(move || self.call(*node, &request)))
                    })
                    .collect();
                calls
                    .into_iter()
                    .filter_map(|(node, call)| {
                        delivered(node, call.join().expect("decide thread")).then_some(*node)
                    })
                    .collect()
            })
        };
        let delivered = decided.len();
        // A committer that persisted its own copy holds the decided bytes with no Decide.
        decided.extend(
            replicated
                .counted
                .iter()
                .filter(|node| !replicated.targets.contains(node)),
        );
        self.copies(|copies| {
            copies.committed(
                &replicated.keys,
                Reached {
                    counted: &replicated.counted,
                    skipped: &replicated.skipped,
                    decided: &decided,
                },
            )
        });
        delivered
    }

    fn prepare_targets(
        &self,
        tx: TxKey,
        commit: Option<(TxKey, NodeId)>,
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
            owner: self.id,
            commit,
            dataset,
            committer: false,
            pages: copies.clone(),
        };
        let for_committer = NodeRequest::Prepare {
            tx,
            owner: self.id,
            commit,
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

    pub(super) fn send_to(&self, nodes: &[NodeId], request: &NodeRequest) {
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
        owner: NodeId,
        commit: Option<(TxKey, NodeId)>,
        dataset: DatasetId,
        committer: bool,
        pages: &[VersionedPage],
    ) -> NodeReply {
        let borrowed: Vec<(u64, u64, &[u8])> = pages
            .iter()
            .map(|copy| (copy.page, copy.version, copy.bytes.as_slice()))
            .collect();
        let prepared =
            self.table()
                .prepare_copies(tx, dataset, &borrowed, committer, TxTag::default());
        match prepared {
            Ok(()) => {
                self.deciders(|deciders| deciders.prepared(tx, Decider { owner, commit }));
                NodeReply::Done
            }
            Err(error) => NodeReply::Failed(pm_error(error)),
        }
    }

    pub fn serve_decide(&self, tx: TxKey, ino: Option<Ino>) -> NodeReply {
        fault::point("target.deciding");
        if fault::drops("target.deciding") {
            return NodeReply::Failed(FsError::Io("fault injection: Decide dropped".into()));
        }
        self.deciders(|deciders| deciders.decided(tx));
        let decided = self.table().decide_copies(tx);
        match (decided, ino) {
            (Decided::Current { dataset, pages }, Some(ino)) => {
                self.invalidate(ino, dataset, &pages)
            }
            // The committer. MRSW: its kernel holds the committed bytes (whole pages, one
            // writer); the base moves with them. MRMW: the merge may hold other writers'
            // bytes its kernel has not seen, so the base stays the one the kernel's copy was
            // read at until the commit drops that copy (`stale_kernel_pages`); a write-back
            // in between (another thread's stores, met by a later decision's invalidation)
            // diffed against the merge would send those writers' bytes back to older values.
            // An unknown mode moves no base (an MRSW commit's own end moves it: `settle`).
            (Decided::Current { dataset, pages }, None) => {
                if self.known_mode(dataset) == Some(Mode::Mrsw) {
                    let mut table = self.table();
                    for page in pages {
                        table.serve_committed((dataset, page));
                    }
                }
            }
            (Decided::Dropped { dataset, pages }, _) => {
                tracing::info!(
                    dataset,
                    ?pages,
                    "copies dropped at their decision; reading them from their owners until they confirm"
                );
                self.copies_behind(dataset, &pages)
            }
            (Decided::Unknown, _) => {}
        }
        NodeReply::Done
    }

    /// This node's copies of `pages` may be older than what their owners count it as
    /// holding: copies prepared here were dropped at their decision (a page of them newer
    /// here, `Decided::Dropped`), or their owner restarted (recovery.rs `owners_restarted`).
    /// The kernel's copies go, and until each owner confirms this node's copies (recovery.rs
    /// `confirm_copies`, which installs anything newer) reads and writes of them go to the
    /// owner (`unconfirmed`), as the node machine registers them.
    pub(super) fn copies_behind(&self, dataset: DatasetId, pages: &[u64]) {
        self.invalidate_dataset(dataset, pages);
        let record = match self.dataset_record(dataset) {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(dataset, %error, "copies behind their owners; no record to register them");
                return;
            }
        };
        let mut unconfirmed = self.unconfirmed.lock().expect("unconfirmed lock");
        for page in pages {
            let owner = self.owner_of(&record, *page);
            if owner != self.id {
                unconfirmed.wait_for(owner, dataset);
            }
        }
    }

    /// Who settles the copies prepared here (`proto/deciders.rs`).
    pub(super) fn deciders<T>(&self, change: impl FnOnce(&mut Deciders) -> T) -> T {
        change(&mut self.deciders.lock().expect("deciders lock"))
    }

    pub(super) fn note_decided_commit(&self, commit: TxKey) {
        self.deciders(|deciders| deciders.note_decided_commit(commit));
    }

    pub fn decided_commit(&self, commit: TxKey) -> bool {
        self.deciders(|deciders| deciders.decided_commit(commit))
    }

    pub fn serve_abort(&self, tx: TxKey) -> NodeReply {
        self.deciders(|deciders| deciders.settled(tx));
        self.table().abort_copies(tx);
        NodeReply::Done
    }
}

/// Where a commit's new copies were prepared (see `Protocol::replicate`).
pub(super) struct Replicated {
    /// The name the targets know these copies by.
    pub target_tx: TxKey,
    /// Nodes that got a Prepare (and get the Decide or Abort).
    pub targets: Vec<NodeId>,
    /// Nodes that hold the new version once decided (targets and a prepared committer).
    pub counted: Vec<NodeId>,
    /// Holders left out because they are not live (behind once this commit is decided).
    pub skipped: BTreeSet<NodeId>,
    pub keys: Vec<PageKey>,
    /// The copies the dataset needs, this owner's included: `min(replicas, live nodes)`.
    pub wanted: usize,
}

impl Replicated {
    /// Why the commit is in doubt after its Decide reached `delivered` targets, if it is:
    /// the owner and a prepared committer (counted, sent no Decide) hold decided bytes too.
    pub fn short_of_copies(&self, delivered: usize) -> Option<String> {
        let prepared_committer = self.counted.len() - self.targets.len();
        short_of_copies(1 + prepared_committer + delivered, self.wanted)
    }
}

/// A commit this owner applied: its answer to the committer.
pub struct Applied {
    pub versions: Vec<u64>,
    pub dataset_version: u64,
    /// Set when fewer than the wanted copies confirmed the decision (proto/replication.rs).
    pub in_doubt: Option<String>,
}

impl Applied {
    pub fn reply(self) -> NodeReply {
        match self.in_doubt {
            None => NodeReply::Committed {
                versions: self.versions,
                dataset_version: self.dataset_version,
            },
            Some(why) => NodeReply::InDoubt {
                why,
                dataset_version: self.dataset_version,
            },
        }
    }
}

fn stale(dataset: DatasetId, page: u64, base: u64, current: u64) -> FsError {
    FsError::Io(format!(
        "page {page} of dataset {dataset} was written against version {base} but is at {current}: \
         another node committed it (MRSW needs a single writer; MRMW merging is not built yet)"
    ))
}
