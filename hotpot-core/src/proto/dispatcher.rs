//! The dispatcher's state machine: namespace (directories, files and their datasets), node
//! registry and liveness. Pure: time comes in as `now_ms`, the runtime persists `state()`
//! after every request that changed it and before replying, so a restart loses nothing
//! that was acknowledged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proto::messages::{DispatcherReply, DispatcherRequest};

mod namespace;
#[cfg(test)]
mod tests;

use crate::proto::types::*;
use namespace::check_name;

/// Dataset versions a home or MRSW writer takes at once (docs/design.md, "Dataset versions").
pub const VERSION_BLOCK: u64 = 1024;

fn version_block() -> u64 {
    VERSION_BLOCK
}

/// A node is live while its last heartbeat is younger than this.
pub const NODE_TIMEOUT_MS: u64 = 3_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Inode {
    attr: Attr,
    /// Directory entries; empty for files.
    children: BTreeMap<String, Ino>,
    /// Where a symbolic link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct NodeRecord {
    addr: String,
    mount: String,
    #[serde(skip)]
    last_heartbeat_ms: Option<u64>,
    #[serde(skip)]
    usage: NodeUsage,
}

/// Everything the dispatcher persists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatcherState {
    cluster_id: u64,
    default_params: DatasetParams,
    next_ino: Ino,
    next_dataset: DatasetId,
    inodes: BTreeMap<Ino, Inode>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    /// MRSW write leases: dataset → the node that may write it.
    #[serde(default)]
    leases: BTreeMap<DatasetId, NodeId>,
    /// The open each lease was last taken for: a `ReleaseLease` names its open, so a release
    /// that arrives after its node took the lease again for another open changes nothing
    /// (found by hotpot-sim: a close's release, reordered after the next open's acquire,
    /// left a writer without a lease and let a second one in).
    #[serde(default)]
    lease_opens: BTreeMap<DatasetId, u64>,
    /// User-level locks and barriers: volatile by design (a program holding one across a
    /// dispatcher restart sees it gone; a dead node's locks are reclaimed).
    #[serde(skip)]
    user_locks: BTreeMap<String, (NodeId, u64)>,
    #[serde(skip)]
    barriers: BTreeMap<String, BarrierRound>,
    /// Per dataset: the first dataset version of the next block a home or writer takes.
    #[serde(default)]
    version_blocks: BTreeMap<DatasetId, u64>,
    /// How many versions a block holds (`VERSION_BLOCK`; smaller in `hotpot-sim`, so its
    /// short runs use blocks up).
    #[serde(default = "version_block")]
    version_block: u64,
    /// Per node: how many times it joined.
    #[serde(default)]
    incarnations: BTreeMap<NodeId, u64>,
    /// Owner promotions: node → the node that owns its chunks now (values are never keys).
    #[serde(default)]
    successors: BTreeMap<NodeId, NodeId>,
    /// A node silent this long is replaced as an owner (0: never). Set by the runtime.
    #[serde(skip)]
    promote_after_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct BarrierRound {
    round: u64,
    arrived: std::collections::BTreeSet<(NodeId, u64)>,
}

impl DispatcherState {
    pub fn new(cluster_id: u64, default_params: DatasetParams, now_ns: u64) -> DispatcherState {
        let root = Inode {
            attr: Attr {
                ino: ROOT_INO,
                kind: Kind::Directory,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 2,
                atime_ns: now_ns,
                mtime_ns: now_ns,
                ctime_ns: now_ns,
                dataset: None,
            },
            children: BTreeMap::new(),
            target: None,
        };
        DispatcherState {
            cluster_id,
            default_params,
            next_ino: ROOT_INO + 1,
            next_dataset: 1,
            inodes: BTreeMap::from([(ROOT_INO, root)]),
            nodes: BTreeMap::new(),
            leases: BTreeMap::new(),
            lease_opens: BTreeMap::new(),
            version_blocks: BTreeMap::new(),
            version_block: VERSION_BLOCK,
            incarnations: BTreeMap::new(),
            user_locks: BTreeMap::new(),
            barriers: BTreeMap::new(),
            successors: BTreeMap::new(),
            promote_after_ms: 0,
        }
    }

    /// How many times each node joined (its latest incarnation, as views name it).
    pub fn incarnations(&self) -> &BTreeMap<NodeId, u64> {
        &self.incarnations
    }

    /// Lost nodes and the nodes promoted in their place.
    pub fn successors(&self) -> &BTreeMap<NodeId, NodeId> {
        &self.successors
    }

    /// Replace a node as the owner of its chunks once it has been silent for `ms` (0: never).
    pub fn set_promote_after_ms(&mut self, ms: u64) {
        self.promote_after_ms = ms;
    }

    /// Blocks of `size` versions from now on (persisted; set before any is granted).
    pub fn set_version_block(&mut self, size: u64) {
        assert!(size > 0, "a version block holds at least one version");
        self.version_block = size;
    }

    /// A file at the root for `dataset`, made elsewhere (its id, owners and first home
    /// chosen there: `hotpot-sim`'s world makes its first datasets before any node joins),
    /// as `Create` would have made it.
    pub fn add_made_dataset(
        &mut self,
        name: &str,
        dataset: Dataset,
        size: u64,
    ) -> Result<Attr, FsError> {
        self.dataset_made(dataset.id);
        self.add_child(
            ROOT_INO,
            name,
            Kind::File,
            0o644,
            0,
            0,
            size,
            Some(dataset),
            0,
        )
    }

    /// `dataset` was made: no later dataset takes its id, and its first block belongs to
    /// its first home (`Dataset::first_home`), which gives its versions without asking: the
    /// blocks granted start after it.
    fn dataset_made(&mut self, dataset: DatasetId) {
        self.next_dataset = self.next_dataset.max(dataset + 1);
        self.version_blocks.insert(dataset, 1 + self.version_block);
    }

    /// Promote a successor for every node silent longer than `promote_after_ms` that still
    /// owns chunks: the next live node by id (the one the commit rule gave its replicas).
    /// Returns whether the map changed.
    fn promote(&mut self, now_ms: u64) -> bool {
        if self.promote_after_ms == 0 {
            return false;
        }
        let live = self.live_nodes(now_ms);
        let silent: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, node)| {
                !self.successors.contains_key(id)
                    && node
                        .last_heartbeat_ms
                        .is_some_and(|at| now_ms.saturating_sub(at) >= self.promote_after_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        let mut changed = false;
        for dead in silent {
            let after = live.iter().find(|node| **node > dead);
            let Some(successor) = after.or(live.first()).copied() else {
                continue; // nobody to promote
            };
            for value in self.successors.values_mut() {
                if *value == dead {
                    *value = successor;
                }
            }
            self.successors.insert(dead, successor);
            self.successors.retain(|node, owner| node != owner);
            changed = true;
        }
        changed
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    fn live_nodes(&self, now_ms: u64) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, node)| is_live(node, now_ms))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Handle one request. Returns the reply and whether persisted state changed.
    pub fn handle(
        &mut self,
        request: DispatcherRequest,
        now_ms: u64,
        now_ns: u64,
    ) -> (DispatcherReply, bool) {
        match self.apply(request, now_ms, now_ns) {
            Ok(done) => done,
            Err(error) => (DispatcherReply::Failed(error), false),
        }
    }

    fn apply(
        &mut self,
        request: DispatcherRequest,
        now_ms: u64,
        now_ns: u64,
    ) -> Result<(DispatcherReply, bool), FsError> {
        use DispatcherRequest as R;
        Ok(match request {
            R::Join {
                node,
                addr,
                mount,
                pm_cluster,
            } => {
                if let Some(other) = pm_cluster.filter(|id| *id != self.cluster_id) {
                    return Err(FsError::Invalid(format!(
                        "node {node}'s PM file belongs to cluster {other:016x}, this is cluster {:016x}",
                        self.cluster_id
                    )));
                }
                let record = NodeRecord {
                    addr,
                    mount,
                    last_heartbeat_ms: Some(now_ms),
                    usage: NodeUsage::default(),
                };
                self.nodes.insert(node, record);
                let incarnation = self.incarnations.entry(node).or_insert(0);
                *incarnation += 1;
                (
                    DispatcherReply::Joined {
                        cluster_id: self.cluster_id,
                        incarnation: *incarnation,
                    },
                    true,
                )
            }
            R::Heartbeat { node, usage } => {
                let record = self
                    .nodes
                    .get_mut(&node)
                    .ok_or_else(|| FsError::Invalid(format!("node {node} has not joined")))?;
                record.last_heartbeat_ms = Some(now_ms);
                record.usage = usage;
                let promoted = self.promote(now_ms);
                // The reply tells the node who its peers are and who owns what.
                (self.status(now_ms), promoted)
            }
            R::Lookup { parent, name } => {
                check_name(&name)?;
                let ino = self.child(parent, &name)?;
                (DispatcherReply::Attr(self.inode(ino)?.attr.clone()), false)
            }
            R::GetAttr { ino } => (DispatcherReply::Attr(self.inode(ino)?.attr.clone()), false),
            R::SetAttr { ino, changes } => {
                let attr = &mut self.inode_mut(ino)?.attr;
                if changes.size.is_some() && attr.kind == Kind::Directory {
                    return Err(FsError::IsDirectory);
                }
                attr.apply(&changes, now_ns);
                (DispatcherReply::Attr(attr.clone()), true)
            }
            R::Mkdir {
                parent,
                name,
                mode,
                uid,
                gid,
            } => {
                let attr = self.add_child(
                    parent,
                    &name,
                    Kind::Directory,
                    mode,
                    uid,
                    gid,
                    0,
                    None,
                    now_ns,
                )?;
                (DispatcherReply::Attr(attr), true)
            }
            R::Create {
                parent,
                name,
                mode,
                uid,
                gid,
                size,
                params,
                exclusive,
            } => {
                check_name(&name)?;
                if let Ok(existing) = self.child(parent, &name) {
                    if exclusive {
                        return Err(FsError::Exists);
                    }
                    let attr = self.inode(existing)?.attr.clone();
                    if attr.kind == Kind::Directory {
                        return Err(FsError::IsDirectory);
                    }
                    return Ok((DispatcherReply::Attr(attr), false));
                }
                let params = params.unwrap_or(self.default_params);
                validate_params(&params)?;
                let owners = self.live_nodes(now_ms);
                if owners.is_empty() {
                    return Err(FsError::Io("no live node to own the dataset".into()));
                }
                // Start the round-robin at a different node for each dataset.
                let shift = (self.next_dataset % owners.len() as u64) as usize;
                let owners: Vec<NodeId> = owners[shift..]
                    .iter()
                    .chain(&owners[..shift])
                    .copied()
                    .collect();
                let first_home: NodeId = owners[0];
                let incarnation = self.incarnations.get(&first_home).copied().unwrap_or(0);
                let dataset = Dataset {
                    id: self.next_dataset,
                    params,
                    owners,
                    first_home: Some((first_home, incarnation)),
                };
                self.dataset_made(self.next_dataset);
                let attr = self.add_child(
                    parent,
                    &name,
                    Kind::File,
                    mode,
                    uid,
                    gid,
                    size,
                    Some(dataset),
                    now_ns,
                )?;
                (DispatcherReply::Attr(attr), true)
            }
            R::Symlink {
                parent,
                name,
                target,
                uid,
                gid,
            } => {
                if target.is_empty() || target.len() > 4095 {
                    return Err(FsError::Invalid(
                        "symlink target must be 1 to 4095 bytes".into(),
                    ));
                }
                let mut attr = self.add_child(
                    parent,
                    &name,
                    Kind::Symlink,
                    0o777,
                    uid,
                    gid,
                    target.len() as u64,
                    None,
                    now_ns,
                )?;
                attr.size = target.len() as u64;
                self.inode_mut(attr.ino)?.target = Some(target);
                (DispatcherReply::Attr(attr), true)
            }
            R::ReadLink { ino } => {
                let target = self.inode(ino)?.target.clone();
                let target =
                    target.ok_or_else(|| FsError::Invalid("not a symbolic link".into()))?;
                (DispatcherReply::Target(target), false)
            }
            R::Unlink { parent, name } => {
                let ino = self.child(parent, &name)?;
                if self.inode(ino)?.attr.kind == Kind::Directory {
                    return Err(FsError::IsDirectory);
                }
                let removed = self.remove_child(parent, &name, now_ns)?;
                (DispatcherReply::Removed { dropped: removed }, true)
            }
            R::Rmdir { parent, name } => {
                let ino = self.child(parent, &name)?;
                let inode = self.inode(ino)?;
                if inode.attr.kind != Kind::Directory {
                    return Err(FsError::NotDirectory);
                }
                if !inode.children.is_empty() {
                    return Err(FsError::NotEmpty);
                }
                self.remove_child(parent, &name, now_ns)?;
                (DispatcherReply::Removed { dropped: None }, true)
            }
            R::Rename {
                parent,
                name,
                new_parent,
                new_name,
            } => {
                let dropped = self.rename(parent, &name, new_parent, &new_name, now_ns)?;
                (DispatcherReply::Removed { dropped }, true)
            }
            R::ReadDir { ino } => {
                let inode = self.inode(ino)?;
                if inode.attr.kind != Kind::Directory {
                    return Err(FsError::NotDirectory);
                }
                let entries = inode
                    .children
                    .iter()
                    .map(|(name, child)| {
                        let kind = self
                            .inode(*child)
                            .map(|c| c.attr.kind)
                            .unwrap_or(Kind::File);
                        DirEntry {
                            name: name.clone(),
                            ino: *child,
                            kind,
                        }
                    })
                    .collect();
                (DispatcherReply::Entries(entries), false)
            }
            R::Resolve { path } => {
                let mut ino = ROOT_INO;
                for part in path
                    .split('/')
                    .filter(|part| !part.is_empty() && *part != ".")
                {
                    check_name(part)?;
                    ino = self.child(ino, part)?;
                }
                (DispatcherReply::Attr(self.inode(ino)?.attr.clone()), false)
            }
            R::Status => (self.status(now_ms), false),
            R::AcquireLease {
                dataset,
                node,
                open,
            } => match self.leases.get(&dataset) {
                Some(holder) if *holder != node && self.node_live(*holder, now_ms) => {
                    return Err(FsError::Busy(format!(
                        "node {holder} holds the write lease of dataset {dataset}"
                    )))
                }
                held => {
                    let same = held == Some(&node) && self.lease_opens.get(&dataset) == Some(&open);
                    self.leases.insert(dataset, node);
                    self.lease_opens.insert(dataset, open);
                    (DispatcherReply::Done, !same)
                }
            },
            R::VersionState { dataset } => (
                DispatcherReply::VersionState {
                    writer: self
                        .leases
                        .get(&dataset)
                        .copied()
                        .filter(|holder| self.node_live(*holder, now_ms)),
                    next_block: self.version_blocks.get(&dataset).copied().unwrap_or(1),
                },
                false,
            ),
            R::VersionBlock { dataset, node } => {
                self.check_block_asker(dataset, node)?;
                let start = self.version_blocks.entry(dataset).or_insert(1);
                let block = *start;
                *start += self.version_block;
                (DispatcherReply::VersionBlock { start: block }, true)
            }
            R::ReleaseLease {
                dataset,
                node,
                open,
            } => {
                let taken_for = self.lease_opens.get(&dataset).copied().unwrap_or(0);
                if self.leases.get(&dataset) == Some(&node) && taken_for == open {
                    self.leases.remove(&dataset);
                    self.lease_opens.remove(&dataset);
                    (DispatcherReply::Done, true)
                } else {
                    (DispatcherReply::Done, false)
                }
            }
            R::LockAcquire { name, holder } => match self.user_locks.get(&name) {
                Some(current) if *current != holder && self.node_live(current.0, now_ms) => {
                    return Err(FsError::Busy(format!("lock {name} is held by {current:?}")))
                }
                _ => {
                    self.user_locks.insert(name, holder);
                    (DispatcherReply::Done, false)
                }
            },
            R::LockRelease { name, holder } => {
                if self.user_locks.get(&name) == Some(&holder) {
                    self.user_locks.remove(&name);
                    (DispatcherReply::Done, false)
                } else {
                    return Err(FsError::Invalid(format!(
                        "lock {name} is not held by {holder:?}"
                    )));
                }
            }
            R::Barrier {
                name,
                parties,
                member,
                round,
            } => {
                if parties == 0 {
                    return Err(FsError::Invalid(
                        "a barrier needs at least one party".into(),
                    ));
                }
                let barrier = self.barriers.entry(name).or_default();
                if barrier.round > round {
                    return Ok((DispatcherReply::Done, false));
                }
                if barrier.round < round {
                    return Err(FsError::Invalid(format!(
                        "barrier is at round {}, not {round}",
                        barrier.round
                    )));
                }
                barrier.arrived.insert(member);
                if barrier.arrived.len() as u32 >= parties {
                    barrier.round += 1;
                    barrier.arrived.clear();
                    (DispatcherReply::Done, false)
                } else {
                    (DispatcherReply::Waiting, false)
                }
            }
            R::LiveDatasets => {
                let mut datasets: Vec<Dataset> = self
                    .inodes
                    .values()
                    .filter_map(|inode| inode.attr.dataset.clone())
                    .collect();
                datasets.sort_by_key(|dataset| dataset.id);
                datasets.dedup_by_key(|dataset| dataset.id);
                (DispatcherReply::Datasets(datasets), false)
            }
        })
    }

    /// A block of an MRSW dataset's versions goes to the node holding its write lease only.
    /// A writer the dispatcher stopped hearing from loses the lease to the next one (no
    /// fencing yet: docs/design.md, "Cluster protocol"); refused a spare block, it can commit
    /// only with the versions it already has, all below the new writer's. A dataset no name
    /// refers to any more (unlinked, still open) keeps getting blocks, as before.
    fn check_block_asker(&self, dataset: DatasetId, node: NodeId) -> Result<(), FsError> {
        let mrsw = self.inodes.values().any(|inode| {
            inode
                .attr
                .dataset
                .as_ref()
                .is_some_and(|known| known.id == dataset && known.params.mode == Mode::Mrsw)
        });
        match self.leases.get(&dataset) {
            Some(holder) if mrsw && *holder != node => Err(FsError::Busy(format!(
                "node {holder} holds the write lease of dataset {dataset}: its versions go to it only"
            ))),
            None if mrsw => Err(FsError::Busy(format!(
                "nobody holds the write lease of dataset {dataset}: its versions go to its writer only"
            ))),
            _ => Ok(()),
        }
    }

    fn node_live(&self, node: NodeId, now_ms: u64) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|record| is_live(record, now_ms))
    }

    fn status(&self, now_ms: u64) -> DispatcherReply {
        let nodes = self
            .nodes
            .iter()
            .map(|(id, node)| NodeInfo {
                id: *id,
                addr: node.addr.clone(),
                mount: node.mount.clone(),
                live: is_live(node, now_ms),
                incarnation: self.incarnations.get(id).copied().unwrap_or(0),
                last_heartbeat_ms_ago: node
                    .last_heartbeat_ms
                    .map(|at| now_ms.saturating_sub(at))
                    .unwrap_or(u64::MAX),
                usage: node.usage.clone(),
            })
            .collect();
        DispatcherReply::Status {
            cluster_id: self.cluster_id,
            nodes,
            successors: self.successors.clone(),
        }
    }
}

/// A node is live while it heartbeats; right after a dispatcher restart (no heartbeat seen
/// yet) every known node counts as live for one timeout, so leases are not handed over early.
fn is_live(node: &NodeRecord, now_ms: u64) -> bool {
    match node.last_heartbeat_ms {
        Some(at) => now_ms.saturating_sub(at) < NODE_TIMEOUT_MS,
        None => now_ms < NODE_TIMEOUT_MS,
    }
}

fn validate_params(params: &DatasetParams) -> Result<(), FsError> {
    if params.replicas == 0 {
        return Err(FsError::Invalid("replicas must be at least 1".into()));
    }
    if params.chunk_pages == 0 {
        return Err(FsError::Invalid(
            "chunk size must be at least one page".into(),
        ));
    }
    Ok(())
}
