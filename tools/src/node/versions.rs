//! Published versions on a node (docs/design.md, "Published versions"): as an MRMW dataset's
//! home or an MRSW dataset's writer it hands out dataset versions from blocks the dispatcher
//! grants; as an owner it serves pins (leases) and reads at a version. Must survive: a home or
//! writer that restarts, moves or changes (a new block, never a reused number), an unreachable
//! home (the commit fails before its apply),
//! a viewing node that dies or restarts (its pins expire), and a view whose version this
//! owner lost (Stale, never other bytes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpot_core::page::ViewKey;
use hotpot_core::pm::PageKey;
use hotpot_core::proto::dispatcher::VERSION_BLOCK;
use hotpot_core::proto::messages::{
    DispatcherReply, DispatcherRequest, NodeReply, NodeRequest, VersionedPage,
};
use hotpot_core::proto::pins::{not_kept, PinLeases, PIN_RENEW_EVERY_MS};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, Mode, NodeId, VersionCounts};
use hotpot_core::proto::versions::{Give, Sequencer};

use super::protocol::{Protocol, RPC_TIMEOUT};

/// What `give_version` is asked for.
#[derive(Clone, Copy)]
enum Want {
    /// The latest given out (below a commit of this writer under way).
    Latest,
    /// The next, for a commit the home numbers.
    Next,
    /// The next, for this MRSW writer's own commit, sent now.
    CommitNext,
}

pub struct Published {
    /// This node's incarnation (how many times it joined the cluster).
    incarnation: AtomicU64,
    /// As a home or writer: the versions it may give out (proto/versions.rs).
    blocks: Mutex<Sequencer>,
    /// As an owner: when each pin was last renewed (proto/pins.rs, the node machine's book
    /// too), in milliseconds since `started`.
    leases: Mutex<PinLeases>,
    started: Instant,
}

impl Default for Published {
    fn default() -> Published {
        Published {
            incarnation: AtomicU64::new(0),
            blocks: Mutex::new(Sequencer::new(VERSION_BLOCK)),
            leases: Mutex::default(),
            started: Instant::now(),
        }
    }
}

impl Published {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, PinLeases> {
        self.leases.lock().expect("pin leases lock")
    }
}

impl Protocol {
    /// The node that hands out the versions of an MRMW `dataset`: the owner of its chunk 0
    /// now. (An MRSW dataset's writer gives them out itself.)
    pub fn home_of(&self, dataset: &Dataset) -> NodeId {
        self.owner_of(dataset, 0)
    }

    /// As an MRSW dataset's writer (its lease holder, whose commits are one at a time): the
    /// version of its next commit, with no message. `None` for MRMW (the home gives it).
    pub(super) fn writer_version(&self, dataset: &Dataset) -> Result<Option<u64>, FsError> {
        match dataset.params.mode {
            Mode::Mrsw => self.give_version(dataset, Want::CommitNext).map(Some),
            Mode::Mrmw => Ok(None),
        }
    }

    /// This node's MRSW commit of `dataset` ended (acknowledged, refused or in doubt): the
    /// latest may name its version now (`Sequencer::committing`).
    pub fn writer_commit_ended(&self, dataset: DatasetId) {
        self.published
            .blocks
            .lock()
            .expect("version blocks lock")
            .commit_ended(dataset);
    }

    /// This node took an MRSW dataset's lease: a fresh block (versions an earlier writer gave
    /// out are all below it), so its first commit needs no dispatcher.
    pub fn start_writing(&self, dataset: &Dataset) -> Result<(), FsError> {
        let mut blocks = self.published.blocks.lock().expect("version blocks lock");
        if blocks.has(dataset.id) {
            return Ok(());
        }
        let start = self.take_block(dataset.id)?;
        blocks.add_block(dataset.id, start);
        Ok(())
    }

    fn is_writing(&self, dataset: &Dataset) -> bool {
        self.published
            .blocks
            .lock()
            .expect("version blocks lock")
            .has(dataset.id)
    }

    /// This node gave an MRSW dataset's lease back: another writer's versions come next.
    pub fn stop_writing(&self, dataset: &Dataset) {
        self.published
            .blocks
            .lock()
            .expect("version blocks lock")
            .drop_dataset(dataset.id);
    }

    /// Ask the home for a version: the next one (`take`) or the latest given out.
    fn ask_home(&self, dataset: &Dataset, take: bool) -> Result<u64, FsError> {
        let home = self.home_of(dataset);
        let request = NodeRequest::Version {
            dataset: dataset.clone(),
            take,
        };
        match super::committer::ask(self, home, request)? {
            NodeReply::Version(version) => Ok(version),
            other => Err(FsError::Io(format!(
                "home node {home} answered a version request with {other:?}"
            ))),
        }
    }

    /// A new dataset version for a commit whose pages are all locked.
    pub(super) fn next_version(&self, dataset: &Dataset) -> Result<u64, FsError> {
        self.ask_home(dataset, true)
    }

    /// The newest version given out (an upper bound of every committed one). MRSW: the
    /// writer's, or with no live writer, everything below the dispatcher's next block.
    pub fn latest_version(&self, dataset: &Dataset) -> Result<u64, FsError> {
        if dataset.params.mode == Mode::Mrmw {
            return self.ask_home(dataset, false);
        }
        if self.is_writing(dataset) {
            return self.give_version(dataset, Want::Latest);
        }
        let request = DispatcherRequest::VersionState {
            dataset: dataset.id,
        };
        let (writer, next_block) = match self
            .peers
            .dispatcher()
            .call::<_, DispatcherReply>(&request, RPC_TIMEOUT)
        {
            Ok(DispatcherReply::VersionState { writer, next_block }) => (writer, next_block),
            Ok(other) => {
                return Err(FsError::Io(format!(
                    "dispatcher answered a version state request with {other:?}"
                )))
            }
            Err(error) => return Err(FsError::Io(format!("dispatcher: {error}"))),
        };
        match writer.filter(|writer| *writer != self.id) {
            // Only the live writer knows: one that does not answer may still give versions
            // from its block, below the next one (found by hotpot-sim: this answered the next
            // block's start minus one, and a later commit took a version at or below it).
            Some(writer) => {
                let request = NodeRequest::Version {
                    dataset: dataset.clone(),
                    take: false,
                };
                let reply = super::committer::ask(self, writer, request).map_err(|error| {
                    FsError::Io(format!(
                        "writer {writer} of dataset {}: {error}",
                        dataset.id
                    ))
                })?;
                match reply {
                    NodeReply::Version(version) => Ok(version),
                    other => Err(FsError::Io(format!(
                        "writer {writer} answered a version request with {other:?}"
                    ))),
                }
            }
            // No live writer: every version given out is below the next block.
            None => Ok(next_block - 1),
        }
    }

    /// `Version` at the home (MRSW: at the writer, asked for the latest).
    pub fn serve_version(&self, dataset: &Dataset, take: bool) -> NodeReply {
        let home = self.home_of(dataset);
        if dataset.params.mode == Mode::Mrmw && home != self.id {
            return NodeReply::Failed(FsError::Io(format!(
                "node {} is not the home of dataset {} (node {home} is)",
                self.id, dataset.id
            )));
        }
        if dataset.params.mode == Mode::Mrsw && !self.is_writing(dataset) {
            return NodeReply::Failed(FsError::Io(format!(
                "node {} is not writing dataset {}",
                self.id, dataset.id
            )));
        }
        let want = if take { Want::Next } else { Want::Latest };
        match self.give_version(dataset, want) {
            Ok(version) => NodeReply::Version(version),
            Err(error) => NodeReply::Failed(error),
        }
    }

    fn give_version(&self, dataset: &Dataset, want: Want) -> Result<u64, FsError> {
        let me = (self.id, self.published.incarnation.load(Ordering::Relaxed));
        let mut blocks = self.published.blocks.lock().expect("version blocks lock");
        loop {
            let given = match want {
                Want::Latest => blocks.give(dataset, me, false),
                Want::Next => blocks.give(dataset, me, true),
                Want::CommitNext => blocks.give_to_commit(dataset, me),
            };
            match given {
                Give::Version(version) => return Ok(version),
                Give::NeedBlock => {
                    let start = self.take_block(dataset.id)?;
                    blocks.add_block(dataset.id, start);
                }
            }
        }
    }

    pub fn set_incarnation(&self, incarnation: u64) {
        self.published
            .incarnation
            .store(incarnation, Ordering::Relaxed);
    }

    /// At start: a fresh block for every dataset this node is the home of and has no
    /// versions for (`Sequencer::needs_block`, the node machine's rule too), so its first
    /// commits need no dispatcher.
    pub fn take_home_blocks(&self, datasets: &[Dataset]) {
        let me = (self.id, self.published.incarnation.load(Ordering::Relaxed));
        let homed: Vec<&Dataset> = {
            let blocks = self.published.blocks.lock().expect("version blocks lock");
            datasets
                .iter()
                .filter(|d| d.params.mode == Mode::Mrmw && self.home_of(d) == self.id)
                .filter(|d| blocks.needs_block(d, me))
                .collect()
        };
        for dataset in homed {
            match self.take_block(dataset.id) {
                Ok(start) => {
                    self.published
                        .blocks
                        .lock()
                        .expect("version blocks lock")
                        .add_block(dataset.id, start);
                }
                Err(error) => {
                    tracing::warn!(dataset = dataset.id, %error, "no version block yet; asked again at the first commit")
                }
            }
        }
    }

    /// From the heartbeat: a spare block for every block more than half given out.
    pub fn refill_version_blocks(&self) {
        let low = self
            .published
            .blocks
            .lock()
            .expect("version blocks lock")
            .running_low();
        for dataset in low {
            let start = match self.take_block(dataset) {
                Ok(start) => start,
                // Refused: this node's write lease went to another node. The other datasets
                // may still get theirs.
                Err(FsError::Busy(why)) => {
                    tracing::warn!(dataset, %why, "no spare block of versions");
                    continue;
                }
                Err(_) => return, // the dispatcher is away: the next heartbeat tries again
            };
            let mut blocks = self.published.blocks.lock().expect("version blocks lock");
            // Not if the lease went meanwhile (an MRSW writer that stopped writing).
            if blocks.has(dataset) {
                blocks.add_block(dataset, start);
            }
        }
    }

    fn take_block(&self, dataset: DatasetId) -> Result<u64, FsError> {
        let request = DispatcherRequest::VersionBlock {
            dataset,
            node: self.id,
        };
        match self
            .peers
            .dispatcher()
            .call::<_, DispatcherReply>(&request, RPC_TIMEOUT)
        {
            Ok(DispatcherReply::VersionBlock { start }) => Ok(start),
            Ok(DispatcherReply::Failed(error)) => Err(error),
            Ok(other) => Err(FsError::Io(format!(
                "dispatcher answered a version block request with {other:?}"
            ))),
            Err(error) => Err(FsError::Io(format!(
                "dispatcher (for a block of versions): {error}"
            ))),
        }
    }

    /// `Pin` at an owner: keep what `view` needs of `dataset` at `version`.
    pub fn serve_pin(&self, view: ViewKey, dataset: &Dataset, version: u64) -> NodeReply {
        if let Err(error) = self.wait_ready() {
            return NodeReply::Failed(error);
        }
        // Owned pages whose dataset version is unknown here get the latest as an upper bound.
        let unknown: Vec<(u64, u64)> = self
            .table()
            .unknown_versions(dataset.id)
            .into_iter()
            .filter(|(page, _)| self.owner_of(dataset, *page) == self.id)
            .collect();
        if !unknown.is_empty() {
            match self.latest_version(dataset) {
                Ok(latest) => self.table().assume_versions(dataset.id, &unknown, latest),
                Err(error) => return NodeReply::Failed(error),
            }
        }
        let pinned = self.table().pin_version(view, dataset.id, version);
        match pinned {
            Ok(()) => {
                let now_ms = self.published.now_ms();
                self.published.leases().pinned(view, now_ms);
                NodeReply::Done
            }
            Err(oldest) => NodeReply::Failed(not_kept(version, dataset.id, self.id, oldest)),
        }
    }

    pub fn serve_unpin(&self, view: ViewKey) -> NodeReply {
        self.published.leases().unpinned(view);
        self.table().unpin_version(view);
        NodeReply::Done
    }

    /// The viewing node still has these views open.
    pub fn serve_renew(&self, views: &[ViewKey]) -> NodeReply {
        let now_ms = self.published.now_ms();
        self.published.leases().renew(views, now_ms);
        NodeReply::Done
    }

    /// Drop pins whose viewing node stopped renewing them.
    pub(super) fn expire_pins(&self) {
        let now_ms = self.published.now_ms();
        let expired = self.published.leases().expired(now_ms);
        for view in expired {
            tracing::warn!(?view, "pin not renewed: the viewing node is gone, released");
            self.table().unpin_version(view);
        }
    }

    /// Views pinned here and the old page versions kept for them (`hotpot status`).
    pub fn version_usage(&self) -> VersionCounts {
        let usage = self.table().pin_usage();
        VersionCounts {
            views_pinned: usage.views,
            frames_kept: usage.frames_kept,
        }
    }

    /// `ReadAt` at an owner: `pages` of `dataset` as they were at `version`. Waits (bounded)
    /// for commits of those pages this owner has not applied: one may be at `<= version`.
    /// Pages this node does not own are refused: a node replaced by a promotion may hold no
    /// copy, which would read as zeros (the node machine's rule).
    pub fn serve_read_at(&self, dataset: DatasetId, version: u64, pages: &[u64]) -> NodeReply {
        let owned = || {
            pages
                .iter()
                .try_for_each(|page| self.check_owner_of(dataset, *page))
        };
        if let Err(error) = self.wait_ready().and_then(|()| owned()) {
            return NodeReply::Failed(error);
        }
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        let settled = match self.settled(&keys) {
            Ok(state) => state,
            Err(error) => return NodeReply::Failed(error),
        };
        let table = self.table();
        drop(settled);
        let mut out = Vec::with_capacity(pages.len());
        for page in pages {
            match table.read_at_version(dataset, *page, version) {
                Ok(bytes) => out.push(VersionedPage {
                    page: *page,
                    version,
                    bytes: bytes.unwrap_or_default(),
                }),
                Err(why) => return NodeReply::Failed(FsError::Stale(why)),
            }
        }
        NodeReply::Pages(out)
    }

    /// The pin threads' loop: as an owner, expire pins; as a viewing node, renew.
    pub fn run_pin_leases(&self, views: &dyn Fn() -> Vec<(NodeId, Vec<ViewKey>)>) {
        loop {
            std::thread::sleep(Duration::from_millis(PIN_RENEW_EVERY_MS));
            self.expire_pins();
            for (owner, views) in views() {
                let request = NodeRequest::RenewPins { views };
                if let Err(error) = super::committer::ask(self, owner, request) {
                    tracing::warn!(owner, %error, "pins not renewed");
                }
            }
        }
    }
}
