//! What the file system asks of a node's pages, commits and versions. The engine (engine.rs)
//! keeps names, opens and sizes, and asks the dispatcher about them; everything about pages
//! goes through a `DataPath`. Two run a node: the daemon's thread-based protocol
//! (`ProtocolPath`, protocol_path.rs) and the node machine (`hotpot node --machine`,
//! node/machine/path.rs), the sans-IO protocol `hotpot-sim` checks.

use std::collections::{BTreeSet, HashMap};

use hotpot_core::page::ViewKey;
use hotpot_core::pm::{PoolUsage, PAGE_BYTES};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, Ino};
use hotpot_fs::Invalidator;

pub trait DataPath: Send + Sync + 'static {
    /// An MRSW dataset's first open for writing on this node: its write lease (waiting for
    /// another node's to end, up to the node's `--lease-wait-ms`, then `Busy`) and versions
    /// for its commits. The open's number, given back to `stop_writing`.
    fn start_writing(&self, dataset: &Dataset) -> Result<u64, FsError>;
    /// The last writer on this node closed: the lease taken for `open` goes back.
    fn stop_writing(&self, dataset: &Dataset, open: u64);
    /// Page `page` as the kernel gets it for file `ino`: this node's view (its writes staged
    /// on the newest copy it has, or its owner's), which becomes the kernel's copy's base.
    fn read_page(&self, ino: Ino, dataset: &Dataset, page: u64) -> Result<Vec<u8>, FsError>;
    /// A FUSE WRITE of file `ino`: the bytes are staged for the next commit.
    fn write(&self, ino: Ino, dataset: &Dataset, offset: u64, data: &[u8]) -> Result<(), FsError>;
    /// The commit point: what this node staged for `dataset` is committed; the pages it
    /// took. An error leaves what it sent staged, for the next commit.
    fn commit(&self, ino: Ino, dataset: &Dataset) -> Result<usize, FsError>;
    /// The file shrank (or grew) to `size`: pages past it go here.
    fn truncate(&self, dataset: DatasetId, size: u64) -> Result<(), FsError>;
    /// The dataset lost its last name and its last open here: its pages go.
    fn drop_dataset(&self, dataset: DatasetId) -> Result<(), FsError>;
    /// The PM pool's frames, for `statfs`.
    fn usage(&self) -> PoolUsage;
    /// The kernel connection exists: cached pages can be invalidated from now on.
    fn attach_invalidator(&self, invalidator: Invalidator);
    /// The newest version of `dataset` given out (`name@latest`, `hotpot stat`).
    fn latest(&self, dataset: &Dataset) -> Result<u64, FsError>;
    /// Pin `view` of `dataset` at `version` at every owner, all or none (`Stale`: an owner
    /// no longer has that version).
    fn pin(&self, view: ViewKey, dataset: &Dataset, version: u64) -> Result<(), FsError>;
    /// The view's pins go (an owner not reached lets its pin expire).
    fn unpin(&self, view: ViewKey, dataset: &Dataset);
    /// Pages of a pinned view, each from its owner (an empty page: never written).
    fn read_at(
        &self,
        dataset: &Dataset,
        version: u64,
        pages: &[u64],
    ) -> Result<HashMap<u64, Vec<u8>>, FsError>;
    /// The versions of `dataset` some owner keeps pinned (owners not reached are left out).
    fn pinned_versions(&self, dataset: &Dataset) -> BTreeSet<u64>;
}

/// The pages `len` bytes at `offset` of a file fall in: (page, offset within it, the range of
/// those bytes in the request's).
pub fn page_pieces(
    offset: u64,
    len: usize,
) -> impl Iterator<Item = (u64, usize, std::ops::Range<usize>)> {
    let end = offset + len as u64;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let page = at / PAGE_BYTES as u64;
        let within = (at % PAGE_BYTES as u64) as usize;
        let take = (PAGE_BYTES - within).min((end - at) as usize);
        let from = (at - offset) as usize;
        at += take as u64;
        Some((page, within, from..from + take))
    })
}
