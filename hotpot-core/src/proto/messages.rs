//! Messages between tools, nodes and the dispatcher. Every request gets exactly one reply;
//! handlers are idempotent where a retry could repeat them.

use serde::{Deserialize, Serialize};

use crate::page::Run;
use crate::proto::types::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DispatcherRequest {
    /// A node starts (or restarts) and announces where it serves. `pm_cluster` is the
    /// cluster its PM file was formatted for (`None`: a new file); another cluster's is refused.
    Join {
        node: NodeId,
        addr: String,
        mount: String,
        pm_cluster: Option<u64>,
    },
    Heartbeat {
        node: NodeId,
        usage: NodeUsage,
    },
    Lookup {
        parent: Ino,
        name: String,
    },
    GetAttr {
        ino: Ino,
    },
    SetAttr {
        ino: Ino,
        changes: AttrChanges,
    },
    Mkdir {
        parent: Ino,
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Create a file backed by a new dataset. `params: None` takes the cluster default.
    Create {
        parent: Ino,
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        params: Option<DatasetParams>,
        exclusive: bool,
    },
    Symlink {
        parent: Ino,
        name: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    ReadLink {
        ino: Ino,
    },
    Unlink {
        parent: Ino,
        name: String,
    },
    Rmdir {
        parent: Ino,
        name: String,
    },
    Rename {
        parent: Ino,
        name: String,
        new_parent: Ino,
        new_name: String,
    },
    ReadDir {
        ino: Ino,
    },
    /// Resolve a path relative to the root ("a/b/c").
    Resolve {
        path: String,
    },
    Status,
    /// Which datasets exist, with their owners (a restarted node drops pages of the others
    /// and re-registers its copies with their owners).
    LiveDatasets,
    /// MRSW: ask for the single-writer lease of a dataset for the open `open` (a number the
    /// node never uses twice, its starts included); granted again to its holder.
    AcquireLease {
        dataset: DatasetId,
        node: NodeId,
        open: u64,
    },
    /// Give back the lease taken for `open`: taken again since, for another open of the same
    /// node, it stays.
    ReleaseLease {
        dataset: DatasetId,
        node: NodeId,
        open: u64,
    },
    /// A dataset's home (or MRSW writer) takes the next block of `VERSION_BLOCK` versions.
    /// An MRSW dataset's blocks go to the node holding its write lease only (`node`, the
    /// asker): a writer whose lease went to another cannot take versions above the new
    /// writer's.
    VersionBlock {
        dataset: DatasetId,
        node: NodeId,
    },
    /// Who gives out an MRSW dataset's versions now (its lease holder), and where the next
    /// block starts (every version given out so far is below it).
    VersionState {
        dataset: DatasetId,
    },
    /// User-level lock `name` for `holder` (a node and a program's own id); Busy if held.
    LockAcquire {
        name: String,
        holder: (NodeId, u64),
    },
    LockRelease {
        name: String,
        holder: (NodeId, u64),
    },
    /// Arrive at round `round` of barrier `name` of `parties` members; `Waiting` until all
    /// have, then `Done` (asking again is safe).
    Barrier {
        name: String,
        parties: u32,
        member: (NodeId, u64),
        round: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DispatcherReply {
    Joined {
        cluster_id: u64,
        /// How many times this node joined (this start included): names this incarnation.
        incarnation: u64,
    },
    Attr(Attr),
    Entries(Vec<DirEntry>),
    Target(String),
    /// The name is gone; `dropped` is the dataset whose last name it was.
    Removed {
        dropped: Option<Dataset>,
    },
    Status {
        cluster_id: u64,
        nodes: Vec<NodeInfo>,
        /// Owner promotions: the chunks of each key node (in every dataset) are owned by its
        /// value node (docs/design.md, "Owner promotion").
        successors: std::collections::BTreeMap<NodeId, NodeId>,
    },
    Datasets(Vec<Dataset>),
    /// Dataset versions `start..start + VERSION_BLOCK` are this home's to give out.
    VersionBlock {
        start: u64,
    },
    VersionState {
        writer: Option<NodeId>,
        next_block: u64,
    },
    Waiting,
    Done,
    Failed(FsError),
}

/// A staged page sent to its owner for a commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageWrite {
    pub page: u64,
    /// The version the writes were made against.
    pub base_version: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl PageWrite {
    /// The copy the commit's targets prepare: these bytes at the next version.
    pub fn next_copy(&self) -> VersionedPage {
        VersionedPage {
            page: self.page,
            version: self.base_version + 1,
            bytes: self.bytes.clone(),
        }
    }
}

/// A page at a version. Empty bytes stand for a page of zeros (never written).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedPage {
    pub page: u64,
    pub version: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// Requests a node serves to peers and tools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// This node's copies of the pages of a dataset (for `hotpot stat`).
    PageCopies {
        dataset: DatasetId,
    },
    /// To the owner: the committed page; `from` becomes a holder.
    Fetch {
        dataset: DatasetId,
        page: u64,
        from: NodeId,
    },
    /// To the owner, over a link that reads its PM one-sided: where its committed copy is
    /// (read next with RDMA READ); `from` becomes a holder, as with `Fetch`.
    Locate {
        dataset: DatasetId,
        page: u64,
        from: NodeId,
    },
    /// To any node: its own persisted copy, if it has one (the owner is unreachable).
    FetchCopy {
        dataset: DatasetId,
        page: u64,
    },
    /// To any node: its own persisted copies of these pages, those it has (a rebuilding owner
    /// takes back what it owned); `None`: of every page of the dataset it has (a starting
    /// node machine, which knows no dataset's size, asks so and keeps the pages it owns).
    FetchCopies {
        dataset: DatasetId,
        pages: Option<Vec<u64>>,
    },
    /// To the owner: commit these pages of `dataset` for `committer`. `followers`: the other
    /// owners of a multi-owner commit `tx` (this owner leads: its decision is the commit's).
    Commit {
        tx: (NodeId, u64),
        followers: Vec<NodeId>,
        dataset: Dataset,
        ino: Ino,
        committer: NodeId,
        /// The committer already persisted these pages at `base + 1` as a Prepared record of
        /// its own: it counts as a copy and needs no Prepare; the reply is its decision.
        committer_prepared: bool,
        pages: Vec<PageWrite>,
        /// The dataset version, when the committer gives it (the MRSW writer does); else the
        /// owner asks the dataset's home.
        version: Option<u64>,
    },
    /// Owner to holders and replicas: persist these new versions, not yet current.
    Prepare {
        tx: (NodeId, u64),
        /// The owner that decides (a copy left waiting asks it).
        owner: NodeId,
        /// Part of multi-owner commit `.0` led by `.1`: a copy left waiting asks the leader,
        /// whose answer is final even when this owner is gone.
        commit: Option<((NodeId, u64), NodeId)>,
        dataset: DatasetId,
        committer: bool,
        pages: Vec<VersionedPage>,
    },
    /// Owner to targets: make the prepared copies current; `ino` is the file whose kernel
    /// page cache must be dropped for those pages (`None` on the committing node).
    Decide {
        tx: (NodeId, u64),
        ino: Option<Ino>,
    },
    Abort {
        tx: (NodeId, u64),
    },
    /// MRMW phase 1, to each owner in node-id order: lock these pages for `tx`, or refuse
    /// with Busy if another commit holds one.
    Lock {
        tx: (NodeId, u64),
        dataset: DatasetId,
        pages: Vec<u64>,
    },
    /// MRMW phase 2: merge the committer's runs into the owner's current pages, replicate,
    /// apply. Pages not yet locked for `tx` are locked (or refused) first; `release` unlocks
    /// them at the end (the one-owner fast path: all three phases in one message).
    CommitRuns {
        tx: (NodeId, u64),
        /// As in `Commit`: the other owners, when this owner leads a multi-owner commit.
        followers: Vec<NodeId>,
        dataset: Dataset,
        ino: Ino,
        committer: NodeId,
        pages: Vec<(u64, Vec<Run>)>,
        release: bool,
    },
    /// MRMW phase 3 (or the undo of phase 1): unlock.
    Unlock {
        tx: (NodeId, u64),
        dataset: DatasetId,
        pages: Vec<u64>,
    },
    /// Multi-owner commit, phase 1 at a follower owner: lock the pages (MRMW: Busy if held;
    /// MRSW: wait), build them, prepare them at holders and replicas and here (a Follower
    /// record naming `leader`), keep the locks.
    OwnerPrepare {
        tx: (NodeId, u64),
        dataset: Dataset,
        ino: Ino,
        committer: NodeId,
        /// As in `Commit`: the committer persisted its own copy (MRSW), it needs no Prepare.
        committer_prepared: bool,
        leader: NodeId,
        pages: OwnerPages,
    },
    /// Phase 3 at a follower: the leader decided (the commit is dataset version
    /// `version`); make the pages current, tell holders, unlock.
    OwnerDecide {
        tx: (NodeId, u64),
        version: u64,
    },
    /// The commit failed before the leader decided: drop the prepared pages, unlock.
    OwnerAbort {
        tx: (NodeId, u64),
    },
    /// To a leader (or the node promoted in place of `leader`): did `tx` commit? An
    /// undecided `tx` is aborted for good by the question.
    Outcome {
        tx: (NodeId, u64),
        leader: NodeId,
    },
    /// To a leader: follower `node` has decided these commits (their outcomes may go).
    Confirm {
        txs: Vec<(NodeId, u64)>,
        node: NodeId,
    },
    /// To a follower: is `tx` still waiting for its decision here?
    Pending {
        tx: (NodeId, u64),
    },
    /// Test builds (feature `fault-injection`): crash at the named point when next reached.
    ArmFault {
        point: String,
    },
    /// To any node, from a leader that lost its PM: did you decide copies of commit `tx`?
    DecidedCommit {
        tx: (NodeId, u64),
    },
    /// To an owner, from a node that restarted or whose prepared copies waited too long:
    /// `from` holds these pages at these versions; the owner registers it as a holder and
    /// answers with its copies that are newer (or differ). Busy while `tx` still runs.
    Register {
        dataset: DatasetId,
        from: NodeId,
        pages: Vec<(u64, u64)>,
        tx: Option<(NodeId, u64)>,
    },
    /// Keep these copies (an owner re-replicating pages that fell below their copy count).
    Install {
        dataset: DatasetId,
        pages: Vec<VersionedPage>,
    },
    /// To a dataset's home (an MRSW dataset's writer): a new dataset version for a commit
    /// (`take`), or the latest one.
    Version {
        dataset: Dataset,
        take: bool,
    },
    /// To any node: the latest version of a dataset (it asks whoever gives them out).
    Latest {
        dataset: Dataset,
    },
    /// To every owner of a dataset: keep what view `view` (a node's own number for it)
    /// needs to read the dataset at `version`; Stale if that version is gone here.
    Pin {
        view: (NodeId, u64),
        dataset: Dataset,
        version: u64,
    },
    Unpin {
        view: (NodeId, u64),
    },
    /// The viewing node still has these views open (pins are leases).
    RenewPins {
        views: Vec<(NodeId, u64)>,
    },
    /// To an owner: its pages of a dataset as they were at `version`.
    ReadAt {
        dataset: DatasetId,
        version: u64,
        pages: Vec<u64>,
    },
    /// The versions of a dataset some view pins on this node.
    PinnedVersions {
        dataset: DatasetId,
    },
    /// A node machine's call to a peer (`hotpot node --machine`): the request with its
    /// sender and the sender's number for the call, by which the machine pairs the reply
    /// with its call and orders one sender's registrations. Tools send bare requests.
    Call {
        from: NodeId,
        call: u64,
        request: Box<NodeRequest>,
    },
}

/// The pages a committer sends a follower owner: whole pages (MRSW) or byte runs (MRMW).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OwnerPages {
    Writes(Vec<PageWrite>),
    Runs(Vec<(u64, Vec<Run>)>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeReply {
    PageCopies(Vec<PageCopy>),
    Page(VersionedPage),
    Copy(Option<VersionedPage>),
    /// Answer to `Locate`; `None` when the owner has no persisted copy (then `Fetch`).
    Located(Option<PageLocation>),
    Committed {
        versions: Vec<u64>,
        /// The dataset version the commit got (multi-owner: the followers apply it too).
        dataset_version: u64,
    },
    /// A dataset version.
    Version(u64),
    Versions(Vec<u64>),
    /// Answer to `Outcome` (true: committed) and `Pending` (true: still waiting).
    Decision(bool),
    Pages(Vec<VersionedPage>),
    Done,
    Failed(FsError),
    /// The owner applied the commit but fewer nodes than the dataset's replicas confirmed
    /// the decision: not acknowledged, and it may or may not survive a node's loss.
    InDoubt {
        why: String,
        /// The dataset version the commit got (0 where not known: a follower's answer).
        dataset_version: u64,
    },
}
