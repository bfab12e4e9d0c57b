//! Messages between tools, nodes and the dispatcher. Every request gets exactly one reply;
//! handlers are idempotent where a retry could repeat them.

use serde::{Deserialize, Serialize};

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
    /// Which datasets exist (a restarted node drops pages of the others).
    LiveDatasets,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DispatcherReply {
    Joined {
        cluster_id: u64,
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
    },
    Datasets(Vec<DatasetId>),
    Done,
    Failed(FsError),
}

/// Requests a node serves to peers and tools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// This node's copies of the pages of a dataset (for `hotpot stat`).
    PageCopies { dataset: DatasetId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeReply {
    PageCopies(Vec<PageCopy>),
    Failed(FsError),
}
