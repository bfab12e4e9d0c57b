//! After a crash (docs/design.md, "Recovery"): rejoining at start, before owner requests are
//! served, and a resolver that settles what a crash left waiting.
//!
//! Rejoin: recovered follower records take their pages' locks again; every live peer says
//! which copies of this node's pages it holds (the holder sets were volatile) and, for a node
//! on a new PM file, the newest copy of each owned page is fetched; this node's copies of
//! other owners' pages are registered with those owners, which send back what is newer.
//! Resolver (every ROUND, or a quarter of resolve_after()): a follower record older than
//! resolve_after() asks its leader (or the node promoted in its place); a holder's prepared
//! copy asks the leader of its commit, or its owner for the current pages; a leader's kept
//! outcome is freed once no live node waits for it; MRMW phase-1 locks of a silent committer
//! expire; pages that fell below their copy count are copied to more live nodes; when this node
//! is promoted in place of a lost one, it takes over its chunks.
//! Must survive: any peer unreachable during any of this (the step is retried next round),
//! commits running meanwhile (every step takes the pages' locks or the holder lock).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use hotpot_core::page::{Decided, TxKey};
use hotpot_core::pm::{PageKey, TxRole, TxTag, PAGE_BYTES};
use hotpot_core::proto::messages::{
    DispatcherReply, DispatcherRequest, NodeReply, NodeRequest, VersionedPage,
};
use hotpot_core::proto::rejoin::AskRule;
use hotpot_core::proto::replication::more_copies;
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, NodeId, PageCopy};

use super::protocol::{pm_error, Protocol, RPC_TIMEOUT};

/// A prepared record waits this long for its decision before it asks (HOTPOT_RESOLVE_AFTER_MS
/// overrides it; the recovery tests use a short one).
fn resolve_after() -> Duration {
    static AFTER: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *AFTER.get_or_init(|| {
        std::env::var("HOTPOT_RESOLVE_AFTER_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(2))
    })
}
const ROUND: Duration = Duration::from_millis(500);
const REREPLICATE_EVERY: Duration = Duration::from_secs(2);
/// How long a rejoining node keeps asking an owner to confirm its copies.
const REGISTER_PATIENCE: Duration = Duration::from_secs(20);
/// How long a commit waits for the outcome of this node's earlier commits in doubt, and how
/// often it asks again meanwhile.
const SETTLE_PATIENCE: Duration = Duration::from_secs(2);
const SETTLE_RETRY: Duration = Duration::from_millis(100);
/// Pages per Install message (4 MiB of page bytes).
const INSTALL_BATCH: usize = 1024;

impl Protocol {
    fn ask(&self, node: NodeId, request: &NodeRequest) -> Result<NodeReply, FsError> {
        let client = self
            .peers
            .client(node)
            .ok_or_else(|| FsError::Io(format!("node {node} is not known")))?;
        match client.call::<_, NodeReply>(request, RPC_TIMEOUT) {
            Ok(NodeReply::Failed(error)) => Err(error),
            Ok(reply) => Ok(reply),
            Err(error) => Err(FsError::Io(format!("node {node}: {error}"))),
        }
    }

    /// Everything of the rejoin before this node serves as an owner (see the module doc).
    pub fn rejoin(&self, datasets: &[Dataset]) {
        let started = Instant::now();
        for pending in self.table().pending() {
            if pending.tag.role == TxRole::Follower {
                let keys: Vec<PageKey> = pending
                    .pages
                    .iter()
                    .map(|page| (pending.dataset, *page))
                    .collect();
                match self.lock_pages(pending.tx, &keys, false) {
                    Ok(mut held) => held.armed = false,
                    Err(error) => {
                        tracing::error!(%error, "a recovered commit cannot lock its pages")
                    }
                }
            }
        }
        let peers = self.copy_sources();
        let mut fetched = 0usize;
        let mut caught_up = 0usize;
        let mut pushed = 0usize;
        for dataset in datasets {
            let (taken, sent) = self.adopt(&peers, dataset);
            fetched += taken;
            pushed += sent;
            for (owner, pages) in self.copies_by_owner(dataset) {
                // Until the owner has confirmed them, these copies may be stale: keep asking
                // (its pages may be in a commit a resolver is settling) before serving.
                let deadline = Instant::now() + REGISTER_PATIENCE;
                loop {
                    match self.register_with(owner, dataset.id, pages.clone(), None) {
                        Ok(newer) => {
                            caught_up += newer;
                            break;
                        }
                        Err(error) if Instant::now() > deadline => {
                            tracing::error!(owner, %error, "copies not confirmed by their owner; their pages go to it until it confirms");
                            self.unconfirmed
                                .lock()
                                .expect("unconfirmed lock")
                                .wait_for(owner, dataset.id);
                            break;
                        }
                        Err(error) => {
                            tracing::debug!(owner, %error, "owner cannot confirm copies yet");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            }
        }
        self.rejoin_ms.store(
            started.elapsed().as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        tracing::info!(
            datasets = datasets.len(),
            fetched,
            caught_up,
            pushed,
            ms = started.elapsed().as_millis() as u64,
            "rejoined"
        );
    }

    /// As the owner of `dataset`'s pages (after a restart, or when promoted): learn their
    /// holders from `peers` (`copy_sources`), take the newest copy of each (this node's own may be
    /// missing or behind: a rebuild, a take-over, or any start after one, which a crash may
    /// have cut short — found by hotpot-sim), and bring holders that are behind up to date.
    /// Returns (pages fetched, pages pushed).
    fn adopt(&self, peers: &[NodeId], dataset: &Dataset) -> (usize, usize) {
        let (mut fetched, mut pushed) = (0usize, 0usize);
        let mut newest: HashMap<u64, (u64, NodeId)> = HashMap::new();
        let mut held: BTreeMap<NodeId, Vec<(u64, u64)>> = BTreeMap::new();
        for peer in peers {
            let Some(copies) = self.copies_of(*peer, dataset.id) else {
                continue;
            };
            held.entry(*peer).or_default();
            for copy in copies
                .iter()
                .filter(|c| self.owner_of(dataset, c.page) == self.id)
            {
                held.entry(*peer)
                    .or_default()
                    .push((copy.page, copy.version));
                let best = newest.entry(copy.page).or_insert((copy.version, *peer));
                if copy.version > best.0 {
                    *best = (copy.version, *peer);
                }
            }
        }
        let outdated: Vec<PageKey> = {
            let table = self.table();
            newest
                .iter()
                .map(|(page, (version, _))| ((dataset.id, *page), *version))
                .filter(|(key, version)| *version > table.version_of(*key))
                .map(|(key, _)| key)
                .collect()
        };
        fetched += self.take_newest(dataset.id, &newest);
        // What every peer holds, against this owner's versions now.
        let mine: HashMap<u64, u64> = {
            let table = self.table();
            newest
                .keys()
                .map(|page| (*page, table.version_of((dataset.id, *page))))
                .collect()
        };
        self.copies(|book| {
            for key in outdated {
                book.outdated(key);
            }
            for (peer, pages) in &held {
                book.rejoined(dataset.id, *peer);
                for (page, version) in pages {
                    book.learned((dataset.id, *page), *peer, *version, mine[page]);
                }
            }
        });
        // Holders behind this owner (they missed a decision while it was down) get its
        // copies now, before anything reads them.
        for (peer, pages) in held {
            let behind: Vec<VersionedPage> = {
                let table = self.table();
                pages
                    .iter()
                    .filter_map(|(page, version)| {
                        let (mine, bytes) = table.read_persisted((dataset.id, *page))?;
                        (mine > *version).then_some(VersionedPage {
                            page: *page,
                            version: mine,
                            bytes,
                        })
                    })
                    .collect()
            };
            for batch in behind.chunks(INSTALL_BATCH) {
                let request = NodeRequest::Install {
                    dataset: dataset.id,
                    pages: batch.to_vec(),
                };
                match self.ask(peer, &request) {
                    Ok(_) => {
                        pushed += batch.len();
                        self.copies(|book| {
                            for copy in batch {
                                book.has_current((dataset.id, copy.page), peer);
                            }
                        });
                    }
                    // Counted behind above: re-replication retries.
                    Err(error) => tracing::warn!(peer, %error, "holder behind not updated"),
                }
            }
        }
        (fetched, pushed)
    }

    /// A node on a new PM file: the newest copy of each owned page, from whoever has it
    /// (batched per node).
    fn take_newest(&self, dataset: DatasetId, newest: &HashMap<u64, (u64, NodeId)>) -> usize {
        let mut by_peer: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
        {
            let table = self.table();
            for (page, (version, peer)) in newest {
                if table.version_of((dataset, *page)) < *version {
                    by_peer.entry(*peer).or_default().push(*page);
                }
            }
        }
        let mut taken = 0;
        for (peer, mut pages) in by_peer {
            pages.sort_unstable();
            for batch in pages.chunks(INSTALL_BATCH) {
                let request = NodeRequest::FetchCopies {
                    dataset,
                    pages: Some(batch.to_vec()),
                };
                match self.ask(peer, &request) {
                    Ok(NodeReply::Pages(copies)) => match self.install(dataset, &copies) {
                        Ok(installed) => taken += installed.len(),
                        Err(error) => tracing::error!(%error, "cannot keep rebuilt pages"),
                    },
                    Ok(other) => tracing::warn!(peer, ?other, "unexpected answer to FetchCopies"),
                    Err(error) => {
                        tracing::warn!(peer, %error, "copies not fetched; they come on demand")
                    }
                }
            }
        }
        taken
    }

    /// Per owner of `dataset` (other than this node), the pages this node holds a copy of,
    /// with their versions (an owner of none of them too: it learns this node holds none).
    fn copies_by_owner(&self, dataset: &Dataset) -> BTreeMap<NodeId, Vec<(u64, u64)>> {
        let mut by_owner: BTreeMap<NodeId, Vec<(u64, u64)>> = dataset
            .owners
            .iter()
            .map(|owner| self.peers.resolve(*owner))
            .filter(|owner| *owner != self.id)
            .map(|owner| (owner, Vec::new()))
            .collect();
        for copy in self.table().pool().pages_of(dataset.id) {
            let owner = self.owner_of(dataset, copy.record.page);
            if owner != self.id {
                by_owner
                    .entry(owner)
                    .or_default()
                    .push((copy.record.page, copy.record.version));
            }
        }
        by_owner
    }

    /// Owners that restarted (`take_view`): their rejoin may not have heard from this node
    /// (cut off from it, or counted down, and not restarting, so not registering either: the
    /// node machine's rule, found by hotpot-sim). This node's copies of their pages are read
    /// through them, the kernel's copies dropped, until they confirm them (`copies_behind`,
    /// then `confirm_copies` in the same round). Pages with staged writes are left alone:
    /// their base moves as their own commit settles (`settle_before_commit`), and their next
    /// commit makes this node a holder again; dropping the kernel's copy of one lost its base
    /// (the recovery matrix's MRSW writer, refused as "written against version 0").
    fn owners_restarted(&self) {
        let owners =
            std::mem::take(&mut *self.restarted_owners.lock().expect("restarted owners lock"));
        if owners.is_empty() {
            return;
        }
        let datasets = match self.datasets() {
            Ok(datasets) => datasets,
            Err(error) => {
                tracing::warn!(?owners, %error, "owners restarted; datasets unknown, asked again next round");
                self.restarted_owners
                    .lock()
                    .expect("restarted owners lock")
                    .extend(owners);
                return;
            }
        };
        for dataset in datasets {
            let mut by_owner = self.copies_by_owner(&dataset);
            for owner in &owners {
                let held: Vec<u64> = {
                    let table = self.table();
                    by_owner
                        .remove(owner)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(page, _)| page)
                        .filter(|page| !table.is_staged((dataset.id, *page)))
                        .collect()
                };
                if !held.is_empty() {
                    tracing::info!(owner, dataset = dataset.id, pages = held.len(), "an owner restarted; reading its pages from it until it confirms this node's copies");
                    self.copies_behind(dataset.id, &held);
                }
            }
        }
    }

    /// Whether this node's copy of `page` is not to be used: it waits for its owner's
    /// confirmation (see `Protocol::unconfirmed`) and was not fetched since while the owner
    /// was silent (then it is the newest copy a live node has, and no commit can change the
    /// page until the owner is back, when it is fetched again: reader.rs).
    pub fn is_unconfirmed(&self, dataset: &Dataset, page: u64) -> bool {
        let unconfirmed = |owner: Option<NodeId>| {
            let book = self.unconfirmed.lock().expect("unconfirmed lock");
            match owner {
                None => book.waits_in(dataset.id),
                Some(owner) => book.waits(owner, dataset.id),
            }
        };
        // Usually nothing waits: the read path pays for no owner lookup then.
        if !unconfirmed(None) {
            return false;
        }
        unconfirmed(Some(self.owner_of(dataset, page)))
            && !self
                .failed_over
                .lock()
                .expect("failed-over lock")
                .contains_key(&(dataset.id, page))
    }

    /// The owners (as they are now) that have not confirmed this node's copies.
    pub(super) fn unconfirmed_by(&self) -> Vec<NodeId> {
        let owners = self.unconfirmed.lock().expect("unconfirmed lock").owners();
        owners.into_iter().collect()
    }

    /// The registrations the rejoin gave up on, asked again (a resolver round): an owner
    /// that answers confirms this node's copies (sending newer ones) and its pages are
    /// served from here again.
    fn confirm_copies(&self) {
        let waiting = self.unconfirmed.lock().expect("unconfirmed lock").pairs();
        for (owner, dataset_id) in waiting {
            // A silent owner would hold this thread for a whole call timeout each round.
            if !self.peers.live().contains(&owner) {
                continue;
            }
            let dataset = match self.dataset_record(dataset_id) {
                Ok(dataset) => dataset,
                Err(error) => {
                    tracing::debug!(dataset = dataset_id, %error, "no record to register copies with yet");
                    continue;
                }
            };
            let pages = self
                .copies_by_owner(&dataset)
                .remove(&owner)
                .unwrap_or_default();
            match self.register_with(owner, dataset_id, pages, None) {
                Ok(newer) => {
                    tracing::info!(
                        owner,
                        dataset = dataset_id,
                        newer,
                        "owner confirmed this node's copies"
                    );
                    self.unconfirmed
                        .lock()
                        .expect("unconfirmed lock")
                        .confirmed(owner, dataset_id);
                }
                Err(error) => tracing::debug!(owner, %error, "owner cannot confirm copies yet"),
            }
        }
    }

    /// Tell `owner` which of its pages this node holds; keep what it sends back (newer).
    /// Returns how many pages were replaced.
    fn register_with(
        &self,
        owner: NodeId,
        dataset: DatasetId,
        pages: Vec<(u64, u64)>,
        tx: Option<TxKey>,
    ) -> Result<usize, FsError> {
        let request = NodeRequest::Register {
            dataset,
            from: self.id,
            pages,
            tx,
        };
        let newer = match self.ask(owner, &request)? {
            NodeReply::Pages(newer) => newer,
            other => return Err(FsError::Io(format!("owner {owner} answered {other:?}"))),
        };
        if let Some(tx) = tx {
            self.deciders(|deciders| deciders.settled(tx));
            self.table().abort_copies(tx);
        }
        let installed = self.install(dataset, &newer)?;
        Ok(installed.len())
    }

    /// Keep copies sent by an owner (only newer versions replace ours) and drop the
    /// kernel's cached pages of those that did.
    pub(super) fn install(
        &self,
        dataset: DatasetId,
        copies: &[VersionedPage],
    ) -> Result<Vec<u64>, FsError> {
        let zeros = vec![0u8; PAGE_BYTES];
        let mut pages = Vec::with_capacity(copies.len());
        for copy in copies {
            let bytes = if copy.bytes.is_empty() {
                &zeros
            } else {
                &copy.bytes
            };
            if bytes.len() != PAGE_BYTES {
                return Err(FsError::Io(format!("a copy of {} bytes", bytes.len())));
            }
            pages.push((copy.page, copy.version, bytes.as_slice()));
        }
        let installed = self
            .table()
            .install_copies(dataset, &pages)
            .map_err(pm_error)?;
        if !installed.is_empty() {
            self.invalidate_dataset(dataset, &installed);
        }
        Ok(installed)
    }

    pub fn serve_install(&self, dataset: DatasetId, pages: &[VersionedPage]) -> NodeReply {
        match self.install(dataset, pages) {
            Ok(_) => NodeReply::Done,
            Err(error) => NodeReply::Failed(error),
        }
    }

    /// At the owner: `from` holds `pages` at those versions. Without `tx` that is all it
    /// holds of this dataset (a rejoin); with it, the copies of a commit it waited for.
    pub fn serve_register(
        &self,
        dataset: DatasetId,
        from: NodeId,
        pages: &[(u64, u64)],
        tx: Option<TxKey>,
    ) -> NodeReply {
        // Never wait here: the sender may be a resolver this node's own commits wait for.
        if !self.is_ready() {
            return NodeReply::Failed(FsError::Busy(format!("node {} is rejoining", self.id)));
        }
        let keys: Vec<PageKey> = pages.iter().map(|(page, _)| (dataset, *page)).collect();
        if self.holds_any(&keys) {
            return NodeReply::Failed(FsError::Busy(
                "pages are in a commit; ask again".to_string(),
            ));
        }
        if tx.is_none() {
            // A rejoin: none of its copies counts until listed (it may have lost some).
            self.copies(|copies| copies.rejoined(dataset, from));
            self.rereplicate_soon
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut newer = Vec::new();
        for (key, (page, version)) in keys.iter().zip(pages) {
            // An owner that lost its PM catches up from a holder that is ahead of it.
            if self.is_rebuilding() && *version > self.table().version_of(*key) {
                self.catch_up_from(from, dataset, *page);
            }
            match self.register_holder(*key, from, Some(*version)) {
                Ok(Some((current, bytes))) if current != *version => newer.push(VersionedPage {
                    page: *page,
                    version: current,
                    bytes,
                }),
                Ok(_) => {}
                Err(error) => return NodeReply::Failed(error),
            }
        }
        NodeReply::Pages(newer)
    }

    fn catch_up_from(&self, node: NodeId, dataset: DatasetId, page: u64) {
        match self.ask(node, &NodeRequest::FetchCopy { dataset, page }) {
            Ok(NodeReply::Copy(Some(copy))) if copy.bytes.len() == PAGE_BYTES => {
                let installed =
                    self.table()
                        .install_copy((dataset, page), copy.version, &copy.bytes);
                match installed {
                    // Copies counted at the version this one replaces are behind it now.
                    Ok(true) => self.copies(|copies| copies.outdated((dataset, page))),
                    Ok(false) => {}
                    Err(error) => {
                        tracing::error!(%error, "cannot keep a page caught up from a holder")
                    }
                }
            }
            Ok(other) => tracing::warn!(node, ?other, "holder has no copy after all"),
            Err(error) => tracing::warn!(node, %error, "cannot catch up from a holder"),
        }
    }

    /// Copies of `keys` (locked by the caller) to every live holder: a follower's commit
    /// decided after a restart, when the holders that prepared it are not known.
    /// Returns whether every live holder got them.
    pub(super) fn push_to_holders(&self, dataset: DatasetId, keys: &[PageKey]) -> bool {
        // Decided here: fetches of these pages need not wait for the Installs below, which
        // drop the holders' kernel copies and so wait for their reads in flight (the stall
        // `copy_to` avoids the same way, and `announce` before its Decides).
        self.copies_final(keys, |_| ());
        let live = self.peers.live();
        let copies = self.persisted_copies(keys);
        self.invalidate_dataset(dataset, &keys.iter().map(|key| key.1).collect::<Vec<_>>());
        let mut all = true;
        let mark = |node: NodeId, current: bool| {
            self.copies(|copies| {
                for key in keys {
                    if current {
                        copies.has_current(*key, node);
                    } else {
                        copies.is_behind(*key, node);
                    }
                }
            })
        };
        for node in self.copies(|copies| copies.holders_of(keys)) {
            if node == self.id {
                continue;
            }
            if !live.contains(&node) {
                mark(node, false);
                continue;
            }
            let request = NodeRequest::Install {
                dataset,
                pages: copies.clone(),
            };
            match self.ask(node, &request) {
                Ok(_) => mark(node, true),
                Err(error) => {
                    tracing::warn!(node, %error, "a holder missed a recovered commit; re-replication retries");
                    mark(node, false);
                    all = false;
                }
            }
        }
        all
    }

    /// The resolver loop (own thread).
    pub fn run_resolver(&self) {
        let mut outcome_seen: HashMap<TxKey, Instant> = HashMap::new();
        let mut last_copy_round = Instant::now();
        let mut successors = self.peers.successors();
        let round = (resolve_after() / 4).min(ROUND);
        loop {
            std::thread::sleep(round);
            let now = self.peers.successors();
            if now != successors {
                let gained: Vec<NodeId> = now
                    .iter()
                    .filter(|(node, by)| **by == self.id && successors.get(node) != Some(by))
                    .map(|(node, _)| *node)
                    .collect();
                if gained.is_empty() || self.take_over(&gained) {
                    successors = now;
                }
            }
            self.resolve_pending(None);
            self.refetch_failed_over();
            self.owners_restarted();
            self.confirm_copies();
            self.resolve_outcomes(&mut outcome_seen);
            self.expire_phase1_locks(resolve_after() * 2);
            let soon = self
                .rereplicate_soon
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if soon || last_copy_round.elapsed() >= REREPLICATE_EVERY {
                last_copy_round = Instant::now();
                if let Err(error) = self.rereplicate() {
                    tracing::warn!(%error, "re-replication round failed; retrying");
                }
            }
        }
    }

    /// Promoted in place of `lost`: become the owner of their chunks (owner requests wait
    /// meanwhile): holders from every peer but the lost ones, the newest copy of every page,
    /// holders behind brought up to date. False: not done (the datasets could not be
    /// listed), the next round tries again.
    fn take_over(&self, lost: &[NodeId]) -> bool {
        let started = Instant::now();
        self.set_ready_to(false);
        let datasets = match self.datasets() {
            Ok(datasets) => datasets,
            Err(error) => {
                tracing::error!(%error, "cannot list datasets to take over; next round");
                return false;
            }
        };
        let peers = self.copy_sources();
        let (mut fetched, mut pushed) = (0, 0);
        for dataset in &datasets {
            let (taken, sent) = self.adopt(&peers, dataset);
            fetched += taken;
            pushed += sent;
        }
        self.set_ready_to(true);
        self.rereplicate_soon
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            ?lost,
            fetched,
            pushed,
            ms = started.elapsed().as_millis() as u64,
            "took over the chunks of lost nodes"
        );
        true
    }

    /// The peers an owner rejoin learns copies from. Rebuilding, or owning a lost node's
    /// chunks (a take-over, or a start after one a crash may have cut short), a peer may
    /// hold the newest copy of an acknowledged commit: every peer but the lost ones, each
    /// asked until it answers (`copies_of`). Otherwise this node's copies are the newest and
    /// the live peers tell who holds what.
    fn copy_sources(&self) -> Vec<NodeId> {
        let rule = self.ask_rule();
        let live = self.peers.live();
        self.peers
            .known()
            .into_iter()
            .filter(|node| *node != self.id)
            .filter(|node| rule.asks(live.contains(node), self.peers.is_lost(*node)))
            .collect()
    }

    /// Whom this node's rejoin asks for their copies, and until when (`proto/rejoin.rs`).
    fn ask_rule(&self) -> AskRule {
        AskRule::new(self.is_rebuilding(), self.successor_of_any())
    }

    /// Whether this node owns the chunks of a lost node.
    fn successor_of_any(&self) -> bool {
        self.peers.successors().values().any(|by| *by == self.id)
    }

    /// `peer`'s copies of `dataset`, asked again until it answers or the rule no longer asks
    /// it (`ask_rule`: lost, or at an ordinary start counted down); a peer not asked
    /// registers its copies when it sees this node's incarnation rise (`owners_restarted`).
    fn copies_of(&self, peer: NodeId, dataset: DatasetId) -> Option<Vec<PageCopy>> {
        let rule = self.ask_rule();
        let mut told = Instant::now();
        loop {
            match self.ask(peer, &NodeRequest::PageCopies { dataset }) {
                Ok(NodeReply::PageCopies(copies)) => return Some(copies),
                Ok(other) => {
                    tracing::warn!(peer, ?other, "unexpected answer to PageCopies");
                    return None;
                }
                // A live peer is waited for even at an ordinary start: one only cut off from
                // this node registers when it sees the start, but not before.
                Err(error)
                    if !rule.asks(self.peers.live().contains(&peer), self.peers.is_lost(peer)) =>
                {
                    tracing::warn!(peer, %error, "peer cannot list its copies; it registers when it learns of this start");
                    return None;
                }
                Err(error) => {
                    if told.elapsed() >= Duration::from_secs(5) {
                        tracing::warn!(peer, %error, "waiting for this peer's copies before serving as their owner (it may hold the newest)");
                        told = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// The outcome of multi-owner commit `commit` is known: every copy here waiting for it is
    /// decided or dropped. This node's own copy of its own commit, when it is no owner in it,
    /// is a participant of its own: it confirms to the leader.
    fn settle_copies_of(&self, commit: TxKey, decided: bool) {
        let waiting = self.deciders(|deciders| deciders.commit_settled(commit, decided));
        for (tx, leader) in waiting {
            let settled = if decided {
                self.table().decide_copies(tx)
            } else {
                self.table().abort_copies(tx);
                Decided::Unknown
            };
            match settled {
                Decided::Current { dataset, pages } => self.invalidate_dataset(dataset, &pages),
                // Only the copy the resolver asked about registers with its owner next; this
                // one may be another owner's part of the commit.
                Decided::Dropped { dataset, pages } => self.copies_behind(dataset, &pages),
                Decided::Unknown => {}
            }
            let own_copy = tx.0 == self.id && commit.0 == self.id;
            let also_follower = self.table().is_pending(commit);
            if decided && own_copy && !also_follower {
                let _ = self.confirmations.send((leader, commit));
            }
        }
    }

    /// Settle copies of `dataset` left waiting by commits this node made (a commit whose
    /// outcome it never heard): its next snapshot must build on the outcome. A question that
    /// fails (an owner or leader just restarted, its old connection dead) is asked again for
    /// up to `SETTLE_PATIENCE`: a commit sent on the old base would only be refused.
    pub fn settle_before_commit(&self, dataset: DatasetId) {
        if self.deciders(|deciders| deciders.is_empty()) {
            return;
        }
        let deadline = Instant::now() + SETTLE_PATIENCE;
        loop {
            let unsettled = self.resolve_pending(Some(dataset));
            if unsettled == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(dataset, unsettled, "commits of this node still in doubt; committing on the base it has (an owner may refuse)");
                return;
            }
            std::thread::sleep(SETTLE_RETRY);
        }
    }

    /// `only`: settle the waiting copies of one dataset at once, whatever their age. Returns
    /// how many copies it asked about and got no answer for.
    fn resolve_pending(&self, only: Option<DatasetId>) -> usize {
        let mut unanswered = 0;
        let waiting: Vec<_> = self
            .table()
            .pending()
            .into_iter()
            .filter(|pending| match only {
                Some(dataset) => pending.dataset == dataset && pending.tag.role != TxRole::Follower,
                None => pending.age >= resolve_after(),
            })
            .collect();
        for pending in waiting {
            if !self.table().is_pending(pending.tx) {
                continue; // settled with another entry of the same commit
            }
            if pending.tag.role == TxRole::Follower {
                match self.ask_outcome(pending.tag.leader, pending.tx) {
                    Some(decided) => {
                        tracing::info!(tx = ?pending.tx, decided, "resolved a follower commit with its leader");
                        self.settle_copies_of(pending.tx, decided);
                        self.finish_follower(pending.tx, decided, None);
                    }
                    None => unanswered += 1,
                }
                continue;
            }
            let decider = self.deciders(|deciders| deciders.get(pending.tx));
            // No decider recorded: this node's own prepared copy; its commit call decides it.
            let Some(decider) = decider else { continue };
            // Before a commit, only this node's own earlier commits: asking a leader about
            // another node's commit in flight would abort it.
            let mine = match decider.commit {
                Some((commit, _)) => commit.0 == self.id,
                None => pending.tx.0 == self.id,
            };
            if only.is_some() && !mine {
                continue;
            }
            // Part of a multi-owner commit: the leader's answer is final, even if the owner
            // that prepared this copy is gone.
            if let Some((commit, leader)) = decider.commit {
                let Some(decided) = self.ask_outcome(leader, commit) else {
                    unanswered += 1;
                    continue;
                };
                tracing::info!(?commit, decided, "a copy left waiting asked the leader");
                // Everything of that commit here at once, then this node's own part of it,
                // so no confirmation frees the outcome while a copy here still needs it.
                self.settle_copies_of(commit, decided);
                self.finish_follower(commit, decided, None);
                // This node's own copy of its own commit: nothing else could change those
                // pages meanwhile (it is their one writer and settles before committing).
                // A copy an owner prepared here: the owner may have moved on; ask it next.
                if pending.tx.0 == self.id {
                    continue;
                }
            }
            let versions: Vec<(u64, u64)> = {
                let table = self.table();
                pending
                    .pages
                    .iter()
                    .map(|page| (*page, table.version_of((pending.dataset, *page))))
                    .collect()
            };
            // A lost owner's pages are settled with the node promoted in its place.
            let owner = self.peers.resolve(decider.owner);
            match self.register_with(owner, pending.dataset, versions, Some(pending.tx)) {
                Ok(newer) => {
                    tracing::info!(tx = ?pending.tx, owner, newer, "a copy left waiting asked its owner")
                }
                Err(error) => {
                    tracing::debug!(owner, %error, "owner cannot settle a waiting copy yet");
                    unanswered += 1;
                }
            }
        }
        unanswered
    }

    /// A kept outcome nobody confirmed in time (a participant crashed, a target missed a
    /// decision) is freed once no node but the lost ones waits for it (`proto/outcome.rs`): a
    /// node that is down may still hold a record that will ask; one replaced by a promotion
    /// owns nothing any more and does not count.
    fn resolve_outcomes(&self, seen: &mut HashMap<TxKey, Instant>) {
        let waiting = self.table().outcomes_waiting();
        seen.retain(|tx, _| waiting.iter().any(|(kept, _)| kept == tx));
        for (tx, participants) in waiting {
            let first = *seen.entry(tx).or_insert_with(Instant::now);
            if first.elapsed() < resolve_after() {
                continue;
            }
            let asked = self.outcome_askees();
            let nobody_waits = matches!(self.serve_pending(tx), NodeReply::Decision(false))
                && asked.iter().all(|node| {
                    matches!(
                        self.ask(*node, &NodeRequest::Pending { tx }),
                        Ok(NodeReply::Decision(false))
                    )
                });
            if nobody_waits {
                let mut table = self.table();
                for node in TxTag::ids(participants) {
                    table.confirm_outcome(tx, node);
                }
            }
        }
    }

    pub(super) fn datasets(&self) -> Result<Vec<Dataset>, FsError> {
        match self
            .peers
            .dispatcher()
            .call::<_, DispatcherReply>(&DispatcherRequest::LiveDatasets, RPC_TIMEOUT)
        {
            Ok(DispatcherReply::Datasets(datasets)) => Ok(datasets),
            Ok(other) => Err(FsError::Io(format!("dispatcher answered {other:?}"))),
            Err(error) => Err(FsError::Io(format!("dispatcher: {error}"))),
        }
    }

    /// Owned pages with fewer live copies than their dataset asks for get more.
    fn rereplicate(&self) -> Result<(), FsError> {
        let live: BTreeSet<NodeId> = self.peers.live().into_iter().collect();
        let mut below = 0u64;
        for dataset in self.datasets()? {
            let mut wanted: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
            let owned: Vec<u64> = self
                .table()
                .pool()
                .pages_of(dataset.id)
                .into_iter()
                .map(|copy| copy.record.page)
                .filter(|page| self.owner_of(&dataset, *page) == self.id)
                .collect();
            for page in owned {
                let key = (dataset.id, page);
                let (current, behind) =
                    self.copies(|copies| (copies.current_of(key), copies.behind_of(key, &live)));
                let mut more: BTreeSet<NodeId> =
                    more_copies(self.id, dataset.params.replicas, &live, &current)
                        .into_iter()
                        .collect();
                below += u64::from(!more.is_empty());
                // Holders behind get the page too; they do not make it short of copies.
                more.extend(behind);
                for node in more {
                    wanted.entry(node).or_default().push(page);
                }
            }
            for (node, pages) in wanted {
                for batch in pages.chunks(INSTALL_BATCH) {
                    self.copy_to(node, dataset.id, batch)?;
                }
            }
        }
        self.below_copies
            .store(below, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Copy owned `pages` to `node` under their locks, then count it as a holder.
    fn copy_to(&self, node: NodeId, dataset: DatasetId, pages: &[u64]) -> Result<(), FsError> {
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        // Never wait: pages in a commit may wait for this very thread to resolve it.
        let Ok(_held) = self.lock_pages(self.next_tx(), &keys, false) else {
            return Ok(()); // next round
        };
        let copies = self.persisted_copies(&keys);
        // This owner's copies stay as they are: fetches need not wait (the Install drops the
        // node's kernel copies, which waits for a read in flight there, which may be a fetch
        // of these very pages: it would stall both until the fetch timed out, 10 s). And a
        // holder before it has the bytes: if the answer is lost, later commits reach it.
        self.copies_final(&keys, |book| {
            keys.iter().for_each(|key| book.sending(*key, node))
        });
        self.ask(
            node,
            &NodeRequest::Install {
                dataset,
                pages: copies,
            },
        )?;
        self.copies(|book| keys.iter().for_each(|key| book.has_current(*key, node)));
        self.rereplicated
            .fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(node, dataset, pages = pages.len(), "re-replicated");
        Ok(())
    }
}
