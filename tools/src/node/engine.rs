//! A node's engine: the page table in PM, the dispatcher for names and datasets, and the
//! commit protocol over the owners of the staged pages. Every FUSE request is one call here.
//! Must survive: a dispatcher that is briefly away (calls retry with backoff), and a crash
//! at any point (only committed bytes are in PM slots; staged bytes are volatile by design).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpot_core::page::{PageTable, ReadOutcome};
use hotpot_core::pm::{PageKey, PAGE_BYTES};
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::staged::{Ended, StagedCommit};
use hotpot_core::proto::types::*;
use hotpot_fs::{Engine, Invalidator, Space};
use hotpot_net::{Client, NetError};

use super::protocol::{pm_error, Protocol};
use views::Synthetic;

mod views;

/// Refuse a change inside `.versions`.
fn writable(ino: Ino) -> Result<(), FsError> {
    match views::synthetic(ino) {
        Some(_) => Err(FsError::ReadOnly(format!(
            "{} is read-only",
            views::VERSIONS_DIR
        ))),
        None => Ok(()),
    }
}

/// Refuse a change inside `.versions`, and a new name that would hide it.
fn writable_name(parent: Ino, name: &str) -> Result<(), FsError> {
    writable(parent)?;
    if parent == ROOT_INO && name == views::VERSIONS_DIR {
        return Err(FsError::Invalid(format!(
            "{name} is reserved for published versions"
        )));
    }
    Ok(())
}

/// How long a node keeps retrying an unreachable dispatcher before failing the request.
const DISPATCHER_RETRY_MS: u64 = 15_000;

struct FileState {
    attr: Attr,
    opens: u32,
    /// Size including writes past the end that are staged but not committed.
    staged_size: Option<u64>,
    /// Unlinked while open here: its pages go at the last release.
    unlinked: bool,
    /// Opens that may write; an MRSW dataset's lease is held while this is above zero.
    writers: u32,
}

pub struct NodeEngine {
    id: NodeId,
    dispatcher: Arc<Client>,
    protocol: Arc<Protocol>,
    files: Mutex<HashMap<Ino, FileState>>,
    /// The MRSW write leases this node holds, by the open each was taken for (its release
    /// names it, so a late release never gives back a later open's lease). Opens and
    /// closes for writing of MRSW datasets hold this lock throughout: whether one is the
    /// first writer of a file (and takes the lease) or the last (and gives it back) is
    /// decided with the lease taken or given, never with another open or close in between.
    leases: Mutex<HashMap<DatasetId, u64>>,
    /// One commit at a time from this node: two would snapshot the same staged pages.
    commit_lock: Mutex<()>,
    lease_wait: Duration,
    call_timeout: Duration,
    /// The `.versions` tree (views.rs).
    views: views::Views,
}

/// Whether this node's stored copy of `key` may be behind its owner's: the owner has not
/// confirmed it since this node's start (`unconfirmed`), or a newer copy is prepared here,
/// waiting for a decision that may have been lost (found by hotpot-sim, seed 10081251: this
/// node's next commit, diffed against the older copy, tore its own acknowledged one). Such a
/// page is read from its owner, as the node machine's reads and writes do.
fn behind(unconfirmed: bool, table: &PageTable, key: PageKey) -> bool {
    unconfirmed || table.in_prepared(key)
}

fn io_error(what: impl std::fmt::Display) -> FsError {
    FsError::Io(what.to_string())
}

impl NodeEngine {
    pub fn new(
        dispatcher: Arc<Client>,
        protocol: Arc<Protocol>,
        lease_wait: Duration,
    ) -> NodeEngine {
        NodeEngine {
            id: protocol.id,
            dispatcher,
            protocol,
            files: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            commit_lock: Mutex::new(()),
            lease_wait,
            call_timeout: hotpot_net::DEFAULT_TIMEOUT,
            views: Default::default(),
        }
    }

    pub fn table(&self) -> std::sync::MutexGuard<'_, PageTable> {
        self.protocol.table()
    }

    /// MRSW: take the dataset's write lease, retrying for `lease_wait`; then EBUSY. Returns
    /// the open it was taken for (a number this node never uses twice, across its starts
    /// too: its transaction sequence).
    fn acquire_lease(&self, dataset: &Dataset) -> Result<u64, FsError> {
        let deadline = Instant::now() + self.lease_wait;
        let open = self.protocol.next_tx().1;
        loop {
            let request = DispatcherRequest::AcquireLease {
                dataset: dataset.id,
                node: self.id,
                open,
            };
            match self.ask(request) {
                Ok(_) => {
                    if let Err(error) = self.protocol.start_writing(dataset) {
                        // No versions to write with: the lease goes back at once.
                        self.release_lease(dataset, open);
                        return Err(error);
                    }
                    return Ok(open);
                }
                Err(FsError::Busy(why)) if Instant::now() >= deadline => {
                    tracing::warn!(dataset = dataset.id, %why, "open for writing refused: the dataset has another writer");
                    return Err(FsError::Busy(why));
                }
                Err(FsError::Busy(_)) => std::thread::sleep(Duration::from_millis(50)),
                Err(other) => return Err(other),
            }
        }
    }

    fn release_lease(&self, dataset: &Dataset, open: u64) {
        self.protocol.stop_writing(dataset);
        let request = DispatcherRequest::ReleaseLease {
            dataset: dataset.id,
            node: self.id,
            open,
        };
        if let Err(error) = self.ask(request) {
            tracing::error!(dataset = dataset.id, %error, "cannot release the write lease");
        }
    }

    /// Ask the dispatcher, retrying while it is unreachable (it may be restarting).
    pub fn ask(&self, request: DispatcherRequest) -> Result<DispatcherReply, FsError> {
        let deadline = std::time::Instant::now() + Duration::from_millis(DISPATCHER_RETRY_MS);
        let mut backoff = Duration::from_millis(20);
        loop {
            match self
                .dispatcher
                .call::<_, DispatcherReply>(&request, self.call_timeout)
            {
                Ok(DispatcherReply::Failed(error)) => return Err(error),
                Ok(reply) => return Ok(reply),
                Err(
                    error @ (NetError::Connect { .. }
                    | NetError::Disconnected { .. }
                    | NetError::Timeout { .. }),
                ) if std::time::Instant::now() < deadline => {
                    tracing::warn!(%error, "dispatcher unreachable, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(error) => return Err(io_error(format!("dispatcher: {error}"))),
            }
        }
    }

    fn ask_attr(&self, request: DispatcherRequest) -> Result<Attr, FsError> {
        match self.ask(request)? {
            DispatcherReply::Attr(attr) => Ok(attr),
            other => Err(io_error(format!(
                "dispatcher sent {other:?} where attributes were due"
            ))),
        }
    }

    /// Record fresh attributes; a file's locally staged size wins over a smaller one.
    fn remember(&self, mut attr: Attr) -> Attr {
        let mut files = self.files.lock().expect("files lock");
        if let Some(state) = files.get_mut(&attr.ino) {
            state.attr = attr.clone();
            if let Some(staged) = state.staged_size {
                if staged > attr.size {
                    attr.size = staged;
                } else {
                    state.staged_size = None;
                }
            }
        }
        attr
    }

    /// Attributes of a file that was unlinked while open here: it lives on, nameless, on
    /// this node until its last release (as on a local file system).
    fn unlinked_attr(&self, ino: Ino) -> Option<Attr> {
        let files = self.files.lock().expect("files lock");
        let state = files.get(&ino).filter(|state| state.unlinked)?;
        let mut attr = state.attr.clone();
        attr.nlink = 0;
        attr.size = state.staged_size.unwrap_or(attr.size).max(attr.size);
        Some(attr)
    }

    /// The dataset behind `ino` and the file's current size on this node.
    fn dataset_of(&self, ino: Ino) -> Result<(Dataset, u64), FsError> {
        {
            let files = self.files.lock().expect("files lock");
            if let Some(state) = files.get(&ino) {
                let dataset = state.attr.dataset.clone().ok_or(FsError::IsDirectory)?;
                return Ok((dataset, state.staged_size.unwrap_or(state.attr.size)));
            }
        }
        // Writeback can arrive after release; fetch what we no longer hold.
        let attr = self.ask_attr(DispatcherRequest::GetAttr { ino })?;
        let dataset = attr.dataset.clone().ok_or(FsError::IsDirectory)?;
        let size = attr.size;
        self.files.lock().expect("files lock").insert(
            ino,
            FileState {
                attr,
                opens: 0,
                staged_size: None,
                unlinked: false,
                writers: 0,
            },
        );
        Ok((dataset, size))
    }

    /// One more open of `ino` (a writer too, with `write`).
    fn opened(&self, ino: Ino, attr: Attr, write: bool) {
        let mut files = self.files.lock().expect("files lock");
        let state = files.entry(ino).or_insert_with(|| FileState {
            attr: attr.clone(),
            opens: 0,
            staged_size: None,
            unlinked: false,
            writers: 0,
        });
        state.attr = attr;
        state.opens += 1;
        if write {
            state.writers += 1;
        }
    }

    /// A page this node owns is read or written here only once its rejoin as an owner is
    /// over (bounded wait): during a take-over its copy may be older than another node's (the
    /// node machine's rule, found by hotpot-sim, seed 14095132).
    fn settled_owner(&self, dataset: &Dataset, page: u64) -> Result<(), FsError> {
        if !self.protocol.is_ready() && self.protocol.owner_of(dataset, page) == self.id {
            self.protocol.wait_ready()?;
        }
        Ok(())
    }

    /// A dataset lost its last name: drop it here now, or at the last local release.
    fn forget_dataset(&self, dropped: Option<Dataset>) -> Result<(), FsError> {
        let Some(dataset) = dropped else {
            return Ok(());
        };
        {
            let mut files = self.files.lock().expect("files lock");
            let open_here = files
                .iter_mut()
                .find(|(_, state)| state.attr.dataset.as_ref().map(|d| d.id) == Some(dataset.id));
            if let Some((ino, state)) = open_here {
                if state.opens > 0 {
                    state.unlinked = true;
                    return Ok(());
                }
                let ino = *ino;
                files.remove(&ino);
            }
        }
        self.table().drop_dataset(dataset.id).map_err(pm_error)
    }

    /// Commit every page this node staged for `dataset`: a snapshot of the staged pages,
    /// grouped by chunk owner. MRSW: each owner's group is atomic, all owners at once; MRMW:
    /// three phases in node-id order. Pages of an owner that failed stay staged, the bytes
    /// sent kept for the next commit to send again, and the call fails.
    fn commit_dataset(&self, dataset: &Dataset, ino: Ino) -> Result<usize, FsError> {
        let _one_at_a_time = self.commit_lock.lock().expect("commit lock");
        self.protocol.note_record(dataset);
        self.protocol.settle_before_commit(dataset.id);
        let snapshots = StagedCommit::snapshot(&mut self.table(), dataset.id);
        let owner_of = |page| self.protocol.owner_of(dataset, page);
        let Some(staged) = StagedCommit::group(snapshots, dataset, owner_of) else {
            return Ok(0);
        };
        // An error does not tell a refusal from a commit in doubt: what was sent is kept
        // for resending either way (the program's own staged bytes).
        let result = super::committer::commit(&self.protocol, dataset, ino, &staged.groups);
        if dataset.params.mode == Mode::Mrsw {
            self.protocol.writer_commit_ended(dataset.id);
        }
        let ended = match result {
            Ok(()) => Ended::Committed,
            Err(_) => Ended::Failed,
        };
        let stale = staged.stale_kernel_pages(dataset, ended);
        // Dropped from the kernel (a page dirty there written back first, against the base
        // it was read at) before the staged pages settle.
        if !stale.is_empty() {
            self.protocol.invalidate(ino, dataset.id, &stale);
        }
        staged.settle(&mut self.table(), dataset, ended);
        result.map(|()| staged.snapshots.len())
    }
}

impl Engine for NodeEngine {
    fn lookup(&self, parent: Ino, name: &str) -> Result<Attr, FsError> {
        if parent == ROOT_INO && name == views::VERSIONS_DIR {
            return self.mirror_attr(ROOT_INO);
        }
        match views::synthetic(parent) {
            Some(Synthetic::Mirror(dir)) => return self.lookup_version(dir, name),
            Some(Synthetic::View(_)) => return Err(FsError::NotDirectory),
            None => {}
        }
        let attr = self.ask_attr(DispatcherRequest::Lookup {
            parent,
            name: name.to_string(),
        })?;
        Ok(self.remember(attr))
    }

    fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        match views::synthetic(ino) {
            Some(Synthetic::Mirror(dir)) => return self.mirror_attr(dir),
            Some(Synthetic::View(view)) => return self.view_attr(view),
            None => {}
        }
        if let Some(attr) = self.unlinked_attr(ino) {
            return Ok(attr);
        }
        let attr = self.ask_attr(DispatcherRequest::GetAttr { ino })?;
        Ok(self.remember(attr))
    }

    fn setattr(&self, ino: Ino, changes: AttrChanges) -> Result<Attr, FsError> {
        writable(ino)?;
        if let Some(size) = changes.size {
            let (dataset, _) = self.dataset_of(ino)?;
            // Pages go first: a crash in between leaves a size whose tail reads as zeros,
            // never bytes that a truncate removed.
            self.table().truncate(dataset.id, size).map_err(pm_error)?;
            if let Some(state) = self.files.lock().expect("files lock").get_mut(&ino) {
                state.staged_size = None;
            }
        }
        if self.unlinked_attr(ino).is_some() {
            let mut files = self.files.lock().expect("files lock");
            let state = files.get_mut(&ino).ok_or(FsError::NotFound)?;
            let now_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos() as u64)
                .unwrap_or(0);
            // A file only this node still knows (unlinked while open) changes here.
            state.attr.apply(&changes, now_ns);
            let mut attr = state.attr.clone();
            attr.nlink = 0;
            return Ok(attr);
        }
        let attr = self.ask_attr(DispatcherRequest::SetAttr { ino, changes })?;
        Ok(self.remember(attr))
    }

    fn mkdir(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        writable_name(parent, name)?;
        self.ask_attr(DispatcherRequest::Mkdir {
            parent,
            name: name.to_string(),
            mode,
            uid,
            gid,
        })
    }

    fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<Attr, FsError> {
        writable_name(parent, name)?;
        self.ask_attr(DispatcherRequest::Create {
            parent,
            name: name.to_string(),
            mode,
            uid,
            gid,
            size: 0,
            params: None,
            exclusive,
        })
    }

    fn symlink(
        &self,
        parent: Ino,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        writable_name(parent, name)?;
        self.ask_attr(DispatcherRequest::Symlink {
            parent,
            name: name.to_string(),
            target: target.to_string(),
            uid,
            gid,
        })
    }

    fn readlink(&self, ino: Ino) -> Result<String, FsError> {
        if views::synthetic(ino).is_some() {
            return Err(FsError::Invalid("not a symbolic link".into()));
        }
        match self.ask(DispatcherRequest::ReadLink { ino })? {
            DispatcherReply::Target(target) => Ok(target),
            other => Err(io_error(format!("dispatcher sent {other:?} for readlink"))),
        }
    }

    fn unlink(&self, parent: Ino, name: &str) -> Result<(), FsError> {
        writable(parent)?;
        match self.ask(DispatcherRequest::Unlink {
            parent,
            name: name.to_string(),
        })? {
            DispatcherReply::Removed { dropped } => self.forget_dataset(dropped),
            other => Err(io_error(format!("dispatcher sent {other:?} for unlink"))),
        }
    }

    fn rmdir(&self, parent: Ino, name: &str) -> Result<(), FsError> {
        writable(parent)?;
        self.ask(DispatcherRequest::Rmdir {
            parent,
            name: name.to_string(),
        })
        .map(|_| ())
    }

    fn rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
    ) -> Result<(), FsError> {
        writable(parent)?;
        writable_name(new_parent, new_name)?;
        match self.ask(DispatcherRequest::Rename {
            parent,
            name: name.to_string(),
            new_parent,
            new_name: new_name.to_string(),
        })? {
            DispatcherReply::Removed { dropped } => self.forget_dataset(dropped),
            other => Err(io_error(format!("dispatcher sent {other:?} for rename"))),
        }
    }

    fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>, FsError> {
        match views::synthetic(ino) {
            Some(Synthetic::Mirror(dir)) => return self.readdir_versions(dir),
            Some(Synthetic::View(_)) => return Err(FsError::NotDirectory),
            None => {}
        }
        match self.ask(DispatcherRequest::ReadDir { ino })? {
            DispatcherReply::Entries(entries) => Ok(entries),
            other => Err(io_error(format!("dispatcher sent {other:?} for readdir"))),
        }
    }

    fn open(&self, ino: Ino, write: bool) -> Result<(), FsError> {
        match views::synthetic(ino) {
            Some(Synthetic::View(view)) => return self.open_view(view, write),
            Some(Synthetic::Mirror(_)) => return Err(FsError::IsDirectory),
            None => {}
        }
        let attr = self.ask_attr(DispatcherRequest::GetAttr { ino })?;
        let single_writer = attr
            .dataset
            .as_ref()
            .filter(|d| write && d.params.mode == Mode::Mrsw);
        // Held until this open is counted: a close in between sees its writer.
        let mut leases = single_writer.map(|_| self.leases.lock().expect("leases lock"));
        if let (Some(dataset), Some(leases)) = (single_writer, leases.as_mut()) {
            let first_writer = {
                let files = self.files.lock().expect("files lock");
                files.get(&ino).is_none_or(|state| state.writers == 0)
            };
            if first_writer {
                let open = self.acquire_lease(dataset)?;
                leases.insert(dataset.id, open);
            }
        }
        self.opened(ino, attr, write);
        Ok(())
    }

    fn release(&self, ino: Ino, write: bool) {
        if let Some(Synthetic::View(view)) = views::synthetic(ino) {
            return self.release_view(view);
        }
        if write {
            // Close-to-open: what was written through this open is committed once its last
            // user is gone. Nobody waits for this, so a failure can only be logged.
            if let Err(error) = self.commit(ino) {
                tracing::error!(ino, %error, "commit at the last close failed; the writes stay staged");
            }
        }
        // Only an MRSW writer's close can give a lease back: only it waits for the lease lock.
        let single_writer = write
            && self
                .files
                .lock()
                .expect("files lock")
                .get(&ino)
                .and_then(|state| state.attr.dataset.as_ref())
                .is_some_and(|dataset| dataset.params.mode == Mode::Mrsw);
        let mut leases = single_writer.then(|| self.leases.lock().expect("leases lock"));
        let (dropped, lease) = {
            let mut files = self.files.lock().expect("files lock");
            let Some(state) = files.get_mut(&ino) else {
                return;
            };
            state.opens = state.opens.saturating_sub(1);
            let mut lease = None;
            if write {
                state.writers = state.writers.saturating_sub(1);
                if state.writers == 0 {
                    lease = state
                        .attr
                        .dataset
                        .clone()
                        .filter(|d| d.params.mode == Mode::Mrsw);
                }
            }
            let dropped = if state.opens == 0 && state.unlinked {
                files.remove(&ino).and_then(|state| state.attr.dataset)
            } else {
                None
            };
            (dropped, lease)
        };
        if let Some(dataset) = lease {
            match leases
                .as_mut()
                .and_then(|leases| leases.remove(&dataset.id))
            {
                Some(open) => self.release_lease(&dataset, open),
                None => tracing::error!(dataset = dataset.id, "no write lease to give back"),
            }
        }
        drop(leases);
        if let Some(dataset) = dropped {
            if let Err(error) = self.table().drop_dataset(dataset.id) {
                tracing::error!(dataset = dataset.id, %error, "cannot drop the pages of an unlinked file");
            }
        }
    }

    fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        match views::synthetic(ino) {
            Some(Synthetic::View(view)) => return self.read_view(view, offset, size),
            Some(Synthetic::Mirror(_)) => return Err(FsError::IsDirectory),
            None => {}
        }
        let (dataset, file_size) = self.dataset_of(ino)?;
        self.protocol.note_cached(ino, dataset.id);
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = file_size.min(offset + size as u64);
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut page_bytes = vec![0u8; PAGE_BYTES];
        let mut at = offset;
        while at < end {
            let page = at / PAGE_BYTES as u64;
            let within = (at % PAGE_BYTES as u64) as usize;
            let take = (PAGE_BYTES - within).min((end - at) as usize);
            let key = (dataset.id, page);
            self.settled_owner(&dataset, page)?;
            // A copy its owner has not confirmed since this node's start may be behind; so
            // may one with a newer copy prepared here, whose decision may have been lost:
            // the owner's copy, which waits for that commit's apply (`behind`), with a page
            // staged here rebased on it (`read_fetched`). So is a page staged here with no
            // copy behind it: its owner may not know this node holds it. The owner reads its
            // own; it is looked up only in those cases (the read path usually pays for no
            // lookup).
            let unconfirmed = self.protocol.is_unconfirmed(&dataset, page);
            let mine = || self.protocol.owner_of(&dataset, page) == self.id;
            let outcome = {
                let mut table = self.table();
                let through = (behind(unconfirmed, &table, key) || table.staged_without_copy(key))
                    && !(table.is_staged(key) && mine());
                if through {
                    ReadOutcome::Absent
                } else {
                    table.read_for_kernel(key, &mut page_bytes)
                }
            };
            match outcome {
                ReadOutcome::Dirty | ReadOutcome::Persisted { .. } => {}
                // The owner without a copy: the page was never written.
                ReadOutcome::Absent if mine() => {
                    match self.protocol.owned_copy(dataset.id, page)? {
                        Some((_, bytes)) => page_bytes = bytes,
                        None => page_bytes.fill(0),
                    }
                }
                ReadOutcome::Absent => {
                    let (version, bytes) = self.protocol.fetch(&dataset, page)?;
                    // The kernel's base is the bytes it gets, stored or not.
                    let (_, served) = self
                        .table()
                        .read_fetched(key, version, bytes)
                        .map_err(pm_error)?;
                    page_bytes = served;
                }
            }
            out.extend_from_slice(&page_bytes[within..within + take]);
            at += take as u64;
        }
        Ok(out)
    }

    fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        writable(ino)?;
        let (dataset, file_size) = self.dataset_of(ino)?;
        self.protocol.note_cached(ino, dataset.id);
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| FsError::Invalid("write past the largest offset".into()))?;
        // A page overwritten whole is not read by the kernel first: its base comes from its
        // owner now, as a read would (found by hotpot-sim: zeros written over a page this
        // node never read were lost, being no change from a zero base).
        // A stored copy its owner has not confirmed since this node's start is no base
        // either: it may miss a commit this node made as it stopped (found by hotpot-sim);
        // nor is one with a newer copy prepared here (`behind`).
        let pages = offset / PAGE_BYTES as u64..end.div_ceil(PAGE_BYTES as u64);
        for page in pages {
            self.settled_owner(&dataset, page)?;
            let unconfirmed = self.protocol.is_unconfirmed(&dataset, page);
            let based = {
                let table = self.table();
                table.has_kernel_base((dataset.id, page))
                    || (!behind(unconfirmed, &table, (dataset.id, page))
                        && table.has_base((dataset.id, page)))
            };
            if based {
                continue;
            }
            if self.protocol.owner_of(&dataset, page) == self.id {
                self.protocol.owned_copy(dataset.id, page)?;
            } else {
                let (version, bytes) = self.protocol.fetch(&dataset, page)?;
                self.table()
                    .serve_copy((dataset.id, page), version, &bytes)
                    .map_err(pm_error)?;
            }
        }
        {
            let mut table = self.table();
            let mut at = offset;
            while at < end {
                let page = at / PAGE_BYTES as u64;
                let within = (at % PAGE_BYTES as u64) as usize;
                let take = (PAGE_BYTES - within).min((end - at) as usize);
                let from = (at - offset) as usize;
                table
                    .stage((dataset.id, page), within, &data[from..from + take])
                    .map_err(pm_error)?;
                at += take as u64;
            }
        }
        if end > file_size {
            if let Some(state) = self.files.lock().expect("files lock").get_mut(&ino) {
                state.staged_size = Some(end.max(state.staged_size.unwrap_or(0)));
            }
        }
        Ok(data.len() as u32)
    }

    fn commit(&self, ino: Ino) -> Result<(), FsError> {
        if views::synthetic(ino).is_some() {
            return Ok(()); // nothing is ever staged there
        }
        let (dataset, _) = self.dataset_of(ino)?;
        let _span = tracing::debug_span!("commit", dataset = dataset.id).entered();
        let pages = self.commit_dataset(&dataset, ino).inspect_err(|error| {
            tracing::warn!(ino, %error, "commit failed; the writes stay staged");
        })?;
        tracing::debug!(pages, "committed");
        let staged_size = {
            let mut files = self.files.lock().expect("files lock");
            match files.get_mut(&ino) {
                // Nameless: its size lives only here.
                Some(state) if state.unlinked => {
                    if let Some(staged) = state.staged_size.take() {
                        state.attr.size = state.attr.size.max(staged);
                    }
                    None
                }
                Some(state) => state.staged_size.filter(|staged| *staged > state.attr.size),
                None => None,
            }
        };
        if let Some(size) = staged_size {
            let attr = self.ask_attr(DispatcherRequest::SetAttr {
                ino,
                changes: AttrChanges {
                    size: Some(size),
                    ..AttrChanges::default()
                },
            })?;
            self.remember(attr);
        }
        Ok(())
    }

    fn space(&self) -> Space {
        let usage = self.table().pool().usage();
        Space {
            pages_total: usage.frames_total,
            pages_free: usage.frames_total - usage.frames_used,
            files: self.files.lock().expect("files lock").len() as u64,
        }
    }

    fn name_is_stable(&self, name: &str) -> bool {
        !views::resolves_at_open(name)
    }

    fn attach_invalidator(&self, invalidator: Invalidator) {
        self.protocol.attach_invalidator(invalidator);
    }
}
