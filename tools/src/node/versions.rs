//! Published versions on a node (docs/design.md, "Published versions"): as a dataset's home
//! it hands out dataset versions from blocks the dispatcher grants; as an owner it serves
//! pins (leases) and reads at a version. Must survive: a home that restarts or moves (a new
//! block, never a reused number), an unreachable home (the commit fails before its apply),
//! a viewing node that dies or restarts (its pins expire), and a view whose version this
//! owner lost (Stale, never other bytes).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpot_core::page::ViewKey;
use hotpot_core::pm::PageKey;
use hotpot_core::proto::messages::{
    DispatcherReply, DispatcherRequest, NodeReply, NodeRequest, VersionedPage,
};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, NodeId, VersionCounts};

use super::protocol::{Protocol, RPC_TIMEOUT};

/// An owner drops a pin not renewed for this long (the viewing node is gone).
pub const PIN_LEASE: Duration = Duration::from_secs(10);
/// How often a viewing node renews its pins.
pub const PIN_RENEW_EVERY: Duration = Duration::from_secs(2);

/// The versions of one dataset this home may still give out: `next..end`.
#[derive(Clone, Copy, Debug)]
struct Block {
    next: u64,
    end: u64,
}

#[derive(Default)]
pub struct Published {
    /// As a home: per dataset, the current block.
    blocks: Mutex<HashMap<DatasetId, Block>>,
    /// As an owner: when each pin was last renewed.
    leases: Mutex<HashMap<ViewKey, Instant>>,
}

impl Protocol {
    /// The node that hands out the versions of `dataset`: the owner of its chunk 0 now.
    pub fn home_of(&self, dataset: &Dataset) -> NodeId {
        self.owner_of(dataset, 0)
    }

    /// Ask the home for a version: the next one (`take`) or the latest given out.
    fn ask_home(&self, dataset: &Dataset, take: bool) -> Result<u64, FsError> {
        let home = self.home_of(dataset);
        let reply = if home == self.id {
            self.serve_version(dataset, take)
        } else {
            let client = self
                .peers
                .client(home)
                .ok_or_else(|| FsError::Io(format!("home node {home} is not known")))?;
            let request = NodeRequest::Version {
                dataset: dataset.clone(),
                take,
            };
            client
                .call::<_, NodeReply>(&request, RPC_TIMEOUT)
                .map_err(|error| {
                    FsError::Io(format!(
                        "home node {home} of dataset {}: {error}",
                        dataset.id
                    ))
                })?
        };
        match reply {
            NodeReply::Version(version) => Ok(version),
            NodeReply::Failed(error) => Err(error),
            other => Err(FsError::Io(format!(
                "home node {home} answered a version request with {other:?}"
            ))),
        }
    }

    /// A new dataset version for a commit whose pages are all locked.
    pub(super) fn next_version(&self, dataset: &Dataset) -> Result<u64, FsError> {
        self.ask_home(dataset, true)
    }

    /// The newest version given out (an upper bound of every committed one).
    pub fn latest_version(&self, dataset: &Dataset) -> Result<u64, FsError> {
        self.ask_home(dataset, false)
    }

    /// `Version` at the home.
    pub fn serve_version(&self, dataset: &Dataset, take: bool) -> NodeReply {
        let home = self.home_of(dataset);
        if home != self.id {
            return NodeReply::Failed(FsError::Io(format!(
                "node {} is not the home of dataset {} (node {home} is)",
                self.id, dataset.id
            )));
        }
        let mut blocks = self.published.blocks.lock().expect("version blocks lock");
        let block = match blocks.get(&dataset.id).copied() {
            Some(block) if block.next < block.end || !take => block,
            _ => match self.take_block(dataset.id) {
                Ok(start) => Block {
                    next: start,
                    end: start + hotpot_core::proto::dispatcher::VERSION_BLOCK,
                },
                Err(error) => return NodeReply::Failed(error),
            },
        };
        assert!(block.next >= 1 && block.next <= block.end);
        let answer = if take { block.next } else { block.next - 1 };
        let next = if take { block.next + 1 } else { block.next };
        blocks.insert(dataset.id, Block { next, ..block });
        NodeReply::Version(answer)
    }

    fn take_block(&self, dataset: DatasetId) -> Result<u64, FsError> {
        let request = DispatcherRequest::VersionBlock { dataset };
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
                self.published
                    .leases
                    .lock()
                    .expect("pin leases lock")
                    .insert(view, Instant::now());
                NodeReply::Done
            }
            Err(oldest) => NodeReply::Failed(FsError::Stale(format!(
                "version {version} of dataset {} is no longer kept on node {} (oldest it can \
                 serve: {oldest})",
                dataset.id, self.id
            ))),
        }
    }

    pub fn serve_unpin(&self, view: ViewKey) -> NodeReply {
        self.published
            .leases
            .lock()
            .expect("pin leases lock")
            .remove(&view);
        self.table().unpin_version(view);
        NodeReply::Done
    }

    /// The viewing node still has these views open.
    pub fn serve_renew(&self, views: &[ViewKey]) -> NodeReply {
        let mut leases = self.published.leases.lock().expect("pin leases lock");
        for view in views {
            if let Some(renewed) = leases.get_mut(view) {
                *renewed = Instant::now();
            }
        }
        NodeReply::Done
    }

    /// Drop pins whose viewing node stopped renewing them.
    pub(super) fn expire_pins(&self) {
        let expired: Vec<ViewKey> = {
            let mut leases = self.published.leases.lock().expect("pin leases lock");
            let old: Vec<ViewKey> = leases
                .iter()
                .filter(|(_, renewed)| renewed.elapsed() >= PIN_LEASE)
                .map(|(view, _)| *view)
                .collect();
            for view in &old {
                leases.remove(view);
            }
            old
        };
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
    pub fn serve_read_at(&self, dataset: DatasetId, version: u64, pages: &[u64]) -> NodeReply {
        if let Err(error) = self.wait_ready() {
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
            std::thread::sleep(PIN_RENEW_EVERY);
            self.expire_pins();
            for (owner, views) in views() {
                let request = NodeRequest::RenewPins { views };
                let reply = if owner == self.id {
                    Ok(super::service::handle(self, request))
                } else {
                    match self.peers.client(owner) {
                        Some(client) => client.call::<_, NodeReply>(&request, RPC_TIMEOUT),
                        None => continue,
                    }
                };
                if let Err(error) = reply {
                    tracing::warn!(owner, %error, "pins not renewed");
                }
            }
        }
    }
}
