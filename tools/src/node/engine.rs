//! A node's engine: the dispatcher for names and datasets, opens and sizes here, and a data
//! path (data.rs) for pages and commits. Every FUSE request is one call here. Must survive: a
//! dispatcher that is briefly away (calls retry with backoff), and a crash at any point (only
//! committed bytes are in PM slots; staged bytes are volatile by design).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::*;
use hotpot_fs::{Engine, Invalidator, Space};
use hotpot_net::Client;

pub use data::{page_pieces, DataPath};
pub use protocol_path::ProtocolPath;
use views::Synthetic;

mod data;
mod dispatcher;
mod protocol_path;
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
    data: Arc<dyn DataPath>,
    files: Mutex<HashMap<Ino, FileState>>,
    /// The MRSW write leases this node holds, by the open each was taken for (its release
    /// names it, so a late release never gives back a later open's lease). Opens and
    /// closes for writing of MRSW datasets hold this lock throughout: whether one is the
    /// first writer of a file (and takes the lease) or the last (and gives it back) is
    /// decided with the lease taken or given, never with another open or close in between.
    leases: Mutex<HashMap<DatasetId, u64>>,
    /// The `.versions` tree (views.rs).
    views: views::Views,
}

fn io_error(what: impl std::fmt::Display) -> FsError {
    FsError::Io(what.to_string())
}

impl NodeEngine {
    pub fn new(id: NodeId, dispatcher: Arc<Client>, data: Arc<dyn DataPath>) -> NodeEngine {
        NodeEngine {
            id,
            dispatcher,
            data,
            files: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
            views: Default::default(),
        }
    }

    /// Ask the dispatcher, retrying while it is unreachable (it may be restarting).
    pub fn ask(&self, request: DispatcherRequest) -> Result<DispatcherReply, FsError> {
        dispatcher::ask(&self.dispatcher, &request)
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
        self.data.drop_dataset(dataset.id)
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
            self.data.truncate(dataset.id, size)?;
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
                let open = self.data.start_writing(dataset)?;
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
                Some(open) => self.data.stop_writing(&dataset, open),
                None => tracing::error!(dataset = dataset.id, "no write lease to give back"),
            }
        }
        drop(leases);
        if let Some(dataset) = dropped {
            if let Err(error) = self.data.drop_dataset(dataset.id) {
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
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = file_size.min(offset + size as u64);
        let mut out = Vec::with_capacity((end - offset) as usize);
        for (page, within, bytes) in page_pieces(offset, (end - offset) as usize) {
            let page_bytes = self.data.read_page(ino, &dataset, page)?;
            out.extend_from_slice(&page_bytes[within..within + bytes.len()]);
        }
        Ok(out)
    }

    fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        writable(ino)?;
        let (dataset, file_size) = self.dataset_of(ino)?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| FsError::Invalid("write past the largest offset".into()))?;
        self.data
            .write(ino, &dataset, offset, data)
            .inspect_err(|error| tracing::warn!(ino, offset, %error, "write refused"))?;
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
        let pages = self.data.commit(ino, &dataset).inspect_err(|error| {
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
        let usage = self.data.usage();
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
        self.data.attach_invalidator(invalidator);
    }
}
