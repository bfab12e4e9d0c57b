//! Value types shared by the dispatcher, the nodes and the tools: dataset parameters,
//! inode attributes, errors that cross the wire. Wire format: postcard (serde).

use serde::{Deserialize, Serialize};

pub type NodeId = u32;
pub type Ino = u64;
pub type DatasetId = u64;

pub const ROOT_INO: Ino = 1;
pub const NAME_MAX_BYTES: usize = 255;
pub const DEFAULT_CHUNK_PAGES: u32 = 1024;
pub const DEFAULT_REPLICAS: u8 = 2;

/// Commit protocol of a dataset, chosen at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Multiple readers, single writer: single-phase commit under a write lease.
    Mrsw,
    /// Multiple readers, multiple writers: three-phase commit with byte merging.
    Mrmw,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(text: &str) -> Result<Mode, String> {
        match text.to_ascii_lowercase().as_str() {
            "mrsw" => Ok(Mode::Mrsw),
            "mrmw" => Ok(Mode::Mrmw),
            other => Err(format!("unknown mode '{other}': expected 'mrsw' or 'mrmw'")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Mode::Mrsw => "mrsw",
            Mode::Mrmw => "mrmw",
        })
    }
}

/// What a creator may choose for a new dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetParams {
    pub mode: Mode,
    pub replicas: u8,
    pub chunk_pages: u32,
}

/// A dataset as the dispatcher records it. The owner of chunk `c` is
/// `owners[c % owners.len()]` (round-robin over the nodes live at creation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    pub id: DatasetId,
    pub params: DatasetParams,
    pub owners: Vec<NodeId>,
    /// Its first home (owner of chunk 0) and that node's incarnation at creation: that
    /// incarnation gives out versions from the first block without asking the dispatcher
    /// (docs/design.md, "Dataset versions").
    #[serde(default)]
    pub first_home: Option<(NodeId, u64)>,
}

impl Dataset {
    pub fn chunk_of_page(&self, page: u64) -> u64 {
        page / self.params.chunk_pages as u64
    }
    pub fn owner_of_chunk(&self, chunk: u64) -> NodeId {
        assert!(!self.owners.is_empty(), "dataset without owners");
        self.owners[(chunk % self.owners.len() as u64) as usize]
    }
    pub fn owner_of_page(&self, page: u64) -> NodeId {
        self.owner_of_chunk(self.chunk_of_page(page))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Directory,
    File,
    Symlink,
}

/// Attributes of an inode, as `stat` shows them. Times in nanoseconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub atime_ns: u64,
    pub mtime_ns: u64,
    pub ctime_ns: u64,
    pub dataset: Option<Dataset>,
}

impl Attr {
    /// Apply a `setattr` at time `now_ns`: a size change is a modification, any change
    /// updates ctime.
    pub fn apply(&mut self, changes: &AttrChanges, now_ns: u64) {
        if let Some(mode) = changes.mode {
            self.mode = mode & 0o7777;
        }
        if let Some(uid) = changes.uid {
            self.uid = uid;
        }
        if let Some(gid) = changes.gid {
            self.gid = gid;
        }
        if let Some(size) = changes.size {
            self.size = size;
            self.mtime_ns = now_ns;
        }
        if let Some(atime) = changes.atime_ns {
            self.atime_ns = atime;
        }
        if let Some(mtime) = changes.mtime_ns {
            self.mtime_ns = mtime;
        }
        self.ctime_ns = now_ns;
    }
}

/// Changes a `setattr` asks for; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrChanges {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<u64>,
    pub mtime_ns: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub ino: Ino,
    pub kind: Kind,
}

/// Errors that cross the wire; each maps to one errno at the FUSE edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("already exists")]
    Exists,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than {NAME_MAX_BYTES} bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// A published version that is not (or no longer) kept.
    #[error("stale: {0}")]
    Stale(String),
    #[error("read-only: {0}")]
    ReadOnly(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Busy(_) => libc::EBUSY,
            FsError::Io(_) => libc::EIO,
            FsError::Stale(_) => libc::ESTALE,
            FsError::ReadOnly(_) => libc::EROFS,
        }
    }
}

/// Per-node numbers reported in heartbeats and shown by `hotpot status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    pub pm_frames_total: u64,
    pub pm_frames_used: u64,
    pub pages_persisted: u64,
    /// Frame bytes this node has sent and received over every connection (received includes
    /// pages it read one-sided from peers' PM over verbs).
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
    pub recovery: RecoveryStatus,
    /// Its open connections to other nodes.
    pub links: Vec<PeerLink>,
    pub fetches: FetchCounts,
    #[serde(default)]
    pub sharing: SharingCounts,
    #[serde(default)]
    pub versions: VersionCounts,
    /// The nodes this node counts as live (its view, which its heartbeat refreshes): a
    /// commit replicates only to these.
    #[serde(default)]
    pub sees_live: Vec<NodeId>,
}

/// Identical-page merging on one node (`hotpot status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharingCounts {
    /// Frames that more than one page's slot names, and the frames that saves.
    pub frames_shared: u64,
    pub bytes_saved: u64,
    pub pages_scanned: u64,
    pub pages_merged: u64,
}

/// Published versions an owner keeps for views (`hotpot status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCounts {
    pub views_pinned: u64,
    /// Old page versions kept copy-on-write for those views.
    pub frames_kept: u64,
}

/// Where an owner's committed copy of a page lies in its PM, for a one-sided read over
/// verbs (answer to `Locate`). The frame a slot names is never written in place, so if the
/// slot's bytes are still `slot` after the frame was read, the frame held this version all
/// along; `data_crc` checks the bytes once more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageLocation {
    pub version: u64,
    /// Byte offsets in the owner's exposed PM.
    pub frame_offset: u64,
    pub slot_offset: u64,
    #[serde(with = "serde_bytes")]
    pub slot: Vec<u8>,
    pub data_crc: u32,
}

impl PageLocation {
    /// Whether `frame`, read one-sided, is this version's page: the slot read after it
    /// (`slot_after`) is still the one located, and the bytes match its checksum. Otherwise
    /// a commit moved the page meanwhile (its frame may hold another page's bytes by now).
    pub fn holds(&self, frame: &[u8], slot_after: &[u8]) -> bool {
        slot_after == self.slot.as_slice() && crc32fast::hash(frame) == self.data_crc
    }
}

/// How this node brought pages from their owners since it started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchCounts {
    /// Two-sided: the owner sent the bytes (`Fetch`).
    pub two_sided: u64,
    /// One-sided: `Locate`, then RDMA READ of the owner's frame.
    pub one_sided: u64,
    /// One-sided reads whose slot changed under them (a commit): fetched two-sided instead.
    pub one_sided_retried: u64,
}

/// One node's connection to a peer, as `hotpot status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLink {
    pub peer: NodeId,
    /// "tcp" or "verbs".
    pub transport: String,
    /// The peer's PM frames can be read one-sided over this link.
    pub one_sided: bool,
}

/// Where a node is in its recovery work (docs/design.md, "Recovery").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    /// "rejoining" (not serving as an owner yet) or "ready".
    pub state: String,
    /// This node was started on a new PM file while datasets existed.
    pub rebuilt: bool,
    /// How long its last rejoin took.
    pub rejoin_ms: u64,
    /// Prepared copies and follower records waiting for a decision.
    pub commits_waiting: u64,
    /// Outcomes it keeps as a leader until every participant has confirmed.
    pub outcomes_kept: u64,
    /// Owned pages with fewer copies than their dataset asks, at the last re-replication round.
    pub pages_below_copies: u64,
    /// Pages this node has copied to other nodes to restore copy counts, since it started.
    pub pages_rereplicated: u64,
    /// Owners that have not confirmed this node's copies of their pages since it started:
    /// those pages are read and written through the owner until it does.
    #[serde(default)]
    pub unconfirmed_by: Vec<NodeId>,
}

/// One node as the dispatcher sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub addr: String,
    pub mount: String,
    pub live: bool,
    /// How many times it joined: a higher one than a peer saw before means it restarted.
    #[serde(default)]
    pub incarnation: u64,
    pub last_heartbeat_ms_ago: u64,
    pub usage: NodeUsage,
}

/// A node's copy of one page, as `hotpot stat` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCopy {
    pub page: u64,
    pub version: u64,
    pub state: String,
}
