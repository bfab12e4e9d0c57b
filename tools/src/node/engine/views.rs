//! The `.versions` tree of a node's mount (docs/design.md, "Views"): `.versions/<dir>/` mirrors
//! the namespace read-only, `<name>@<v>` and `<name>@latest` are read-only views of a file's
//! dataset at one version. A view is pinned at every owner while it is open here (and for a
//! few seconds after an `@latest` lookup, so the open that follows finds it pinned); reads go
//! to the owners at that version. Must survive: an owner that no longer has the version
//! (ESTALE), a producer committing during the pin (`@latest` resolves again), and this node
//! dying (its pins are leases the owners drop).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpot_core::page::ViewKey;
use hotpot_core::pm::PAGE_BYTES;
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::*;

use super::{io_error, NodeEngine};

pub const VERSIONS_DIR: &str = ".versions";
const LATEST: &str = "latest";
/// Synthetic inode numbers: a mirrored directory is its real number with this bit; a view
/// is this node's own number for it with the other.
const MIRROR_BIT: Ino = 1 << 62;
const VIEW_BIT: Ino = 1 << 61;
/// How often `@latest` is resolved again when a commit overtakes its pin.
const LATEST_RETRIES: u32 = 20;
/// A view pinned by a lookup but never opened is let go after this.
const LOOKUP_PIN_GRACE: Duration = Duration::from_secs(5);
/// A view neither open nor pinned for this long is forgotten (its inode then reads ESTALE).
const IDLE_VIEW_FORGET: Duration = Duration::from_secs(60);

pub enum Synthetic {
    Mirror(Ino),
    View(Ino),
}

pub fn synthetic(ino: Ino) -> Option<Synthetic> {
    if ino & MIRROR_BIT != 0 {
        Some(Synthetic::Mirror(ino & !MIRROR_BIT))
    } else if ino & VIEW_BIT != 0 {
        Some(Synthetic::View(ino))
    } else {
        None
    }
}

/// `name@latest` names another version after every commit.
pub fn resolves_at_open(name: &str) -> bool {
    name.rsplit_once('@')
        .is_some_and(|(_, wanted)| wanted == LATEST)
}

struct View {
    file: Ino,
    dataset: Dataset,
    version: u64,
    /// Last looked up, opened or closed: a view idle long enough is forgotten.
    last_used: Instant,
    opens: u32,
    /// Pinned at the owners since then (`None`: not pinned).
    pinned_at: Option<Instant>,
}

pub struct Views {
    by_ino: Mutex<HashMap<Ino, View>>,
    next: AtomicU64,
    /// Held across a pin or unpin and its messages, so the two never cross for one view.
    pinning: Mutex<()>,
}

impl Default for Views {
    fn default() -> Views {
        // View numbers name pins at the owners: a restarted node starts elsewhere, so its
        // new views never take over an old incarnation's pins.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| (since.as_millis() as u64 & 0xFFFF_FFFF) << 16)
            .unwrap_or(0);
        Views {
            by_ino: Mutex::new(HashMap::new()),
            next: AtomicU64::new(start),
            pinning: Mutex::new(()),
        }
    }
}

fn read_only(attr: &mut Attr) {
    attr.mode &= !0o222;
}

impl NodeEngine {
    fn views(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, View>> {
        self.views.by_ino.lock().expect("views lock")
    }

    /// The view inode of `file` at `version` (one per pair on this node).
    fn view_ino(&self, file: Ino, dataset: &Dataset, version: u64) -> Ino {
        let mut views = self.views();
        if let Some((ino, view)) = views
            .iter_mut()
            .find(|(_, view)| view.file == file && view.version == version)
        {
            view.last_used = Instant::now();
            return *ino;
        }
        let ino = VIEW_BIT | (self.views.next.fetch_add(1, Ordering::Relaxed) & (VIEW_BIT - 1));
        views.insert(
            ino,
            View {
                file,
                dataset: dataset.clone(),
                version,
                opens: 0,
                pinned_at: None,
                last_used: Instant::now(),
            },
        );
        ino
    }

    pub(super) fn mirror_attr(&self, dir: Ino) -> Result<Attr, FsError> {
        let mut attr = self.ask_attr(DispatcherRequest::GetAttr { ino: dir })?;
        if attr.kind != Kind::Directory {
            return Err(FsError::NotDirectory);
        }
        attr.ino = MIRROR_BIT | dir;
        read_only(&mut attr);
        Ok(attr)
    }

    pub(super) fn view_attr(&self, ino: Ino) -> Result<Attr, FsError> {
        let file = self.views().get(&ino).map(|view| view.file);
        let file = file.ok_or_else(|| FsError::Stale(format!("view {ino} is not known here")))?;
        let mut attr = self.ask_attr(DispatcherRequest::GetAttr { ino: file })?;
        attr.ino = ino;
        read_only(&mut attr);
        Ok(attr)
    }

    /// `lookup` in a mirrored directory: a sub-directory, or `name@v` / `name@latest`.
    pub(super) fn lookup_version(&self, dir: Ino, name: &str) -> Result<Attr, FsError> {
        let Some((base, wanted)) = name.rsplit_once('@') else {
            let attr = self.ask_attr(DispatcherRequest::Lookup {
                parent: dir,
                name: name.to_string(),
            })?;
            return match attr.kind {
                Kind::Directory => self.mirror_attr(attr.ino),
                _ => Err(FsError::NotFound),
            };
        };
        let file = self.ask_attr(DispatcherRequest::Lookup {
            parent: dir,
            name: base.to_string(),
        })?;
        let dataset = file.dataset.clone().ok_or(FsError::NotFound)?;
        let ino = if wanted == LATEST {
            self.pin_latest(file.ino, &dataset)?
        } else {
            let version: u64 = wanted.parse().map_err(|_| FsError::NotFound)?;
            let latest = self.data.latest(&dataset)?;
            if version > latest {
                return Err(FsError::NotFound);
            }
            self.view_ino(file.ino, &dataset, version)
        };
        self.view_attr(ino)
    }

    /// Resolve `@latest` and pin it, again if a commit overtook the pin.
    fn pin_latest(&self, file: Ino, dataset: &Dataset) -> Result<Ino, FsError> {
        let mut last_error = None;
        for _ in 0..LATEST_RETRIES {
            let latest = self.data.latest(dataset)?;
            let ino = self.view_ino(file, dataset, latest);
            match self.pin(ino) {
                Ok(()) => return Ok(ino),
                Err(FsError::Stale(why)) => last_error = Some(why),
                Err(other) => return Err(other),
            }
        }
        Err(FsError::Stale(format!(
            "the latest version kept moving ahead of its pin {LATEST_RETRIES} times: {}",
            last_error.unwrap_or_default()
        )))
    }

    fn view_key(&self, ino: Ino) -> ViewKey {
        (self.id, ino)
    }

    /// Pin view `ino` at every owner (all or none).
    fn pin(&self, ino: Ino) -> Result<(), FsError> {
        let _pinning = self.views.pinning.lock().expect("pinning lock");
        let (dataset, version) = {
            let views = self.views();
            let view = views
                .get(&ino)
                .ok_or_else(|| FsError::Stale(format!("view {ino} is not known here")))?;
            if view.pinned_at.is_some() {
                return Ok(());
            }
            (view.dataset.clone(), view.version)
        };
        self.data.pin(self.view_key(ino), &dataset, version)?;
        if let Some(view) = self.views().get_mut(&ino) {
            view.pinned_at = Some(Instant::now());
        }
        Ok(())
    }

    /// Unpin view `ino` everywhere, unless it is open (again).
    fn unpin(&self, ino: Ino) {
        let _pinning = self.views.pinning.lock().expect("pinning lock");
        let dataset = {
            let mut views = self.views();
            let Some(view) = views.get_mut(&ino) else {
                return;
            };
            if view.opens > 0 || view.pinned_at.take().is_none() {
                return;
            }
            view.dataset.clone()
        };
        self.data.unpin(self.view_key(ino), &dataset);
    }

    pub(super) fn open_view(&self, ino: Ino, write: bool) -> Result<(), FsError> {
        if write {
            return Err(FsError::ReadOnly(
                "a published version cannot be written".into(),
            ));
        }
        // Counted first: an unpin running now leaves an open view alone.
        {
            let mut views = self.views();
            let view = views
                .get_mut(&ino)
                .ok_or_else(|| FsError::Stale(format!("view {ino} is not known here")))?;
            view.opens += 1;
            view.last_used = Instant::now();
        }
        self.pin(ino).inspect_err(|_| self.release_view(ino))
    }

    pub(super) fn release_view(&self, ino: Ino) {
        let last = {
            let mut views = self.views();
            let Some(view) = views.get_mut(&ino) else {
                return;
            };
            view.opens = view.opens.saturating_sub(1);
            view.last_used = Instant::now();
            view.opens == 0
        };
        if last {
            self.unpin(ino);
        }
    }

    pub(super) fn read_view(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let (file, dataset, version) = {
            let views = self.views();
            let view = views
                .get(&ino)
                .ok_or_else(|| FsError::Stale(format!("view {ino} is not known here")))?;
            (view.file, view.dataset.clone(), view.version)
        };
        let (_, file_size) = self.dataset_of(file)?;
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = file_size.min(offset + size as u64);
        let first = offset / PAGE_BYTES as u64;
        let last = (end - 1) / PAGE_BYTES as u64;
        let wanted: Vec<u64> = (first..=last).collect();
        let pages = self.data.read_at(&dataset, version, &wanted)?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        let zeros = [0u8; PAGE_BYTES];
        let mut at = offset;
        while at < end {
            let page = at / PAGE_BYTES as u64;
            let within = (at % PAGE_BYTES as u64) as usize;
            let take = (PAGE_BYTES - within).min((end - at) as usize);
            let bytes = pages.get(&page).filter(|bytes| !bytes.is_empty());
            let bytes = bytes.map_or(&zeros[..], |bytes| bytes.as_slice());
            if bytes.len() != PAGE_BYTES {
                return Err(io_error(format!(
                    "owner sent {} bytes for page {page}",
                    bytes.len()
                )));
            }
            out.extend_from_slice(&bytes[within..within + take]);
            at += take as u64;
        }
        Ok(out)
    }

    /// `readdir` of a mirrored directory: its sub-directories, and per file the latest
    /// version and every version an owner has pinned.
    pub(super) fn readdir_versions(&self, dir: Ino) -> Result<Vec<DirEntry>, FsError> {
        let entries = match self.ask(DispatcherRequest::ReadDir { ino: dir })? {
            DispatcherReply::Entries(entries) => entries,
            other => return Err(io_error(format!("dispatcher sent {other:?} for readdir"))),
        };
        let mut out = Vec::new();
        for entry in entries {
            match entry.kind {
                Kind::Directory => out.push(DirEntry {
                    ino: MIRROR_BIT | entry.ino,
                    ..entry
                }),
                Kind::File => {
                    let attr = self.ask_attr(DispatcherRequest::GetAttr { ino: entry.ino })?;
                    let Some(dataset) = attr.dataset else {
                        continue;
                    };
                    let mut versions = BTreeSet::from([self.data.latest(&dataset)?]);
                    versions.extend(self.data.pinned_versions(&dataset));
                    for version in versions {
                        out.push(DirEntry {
                            name: format!("{}@{version}", entry.name),
                            ino: self.view_ino(entry.ino, &dataset, version),
                            kind: Kind::File,
                        });
                    }
                }
                Kind::Symlink => {}
            }
        }
        Ok(out)
    }

    /// For the pin lease thread: the views pinned here, after letting go of `@latest` pins
    /// whose lookup was never followed by an open and forgetting views idle for a minute.
    pub fn pinned_views(&self) -> Vec<(ViewKey, Dataset)> {
        let unopened: Vec<Ino> = self
            .views()
            .iter()
            .filter(|(_, view)| {
                view.opens == 0
                    && view
                        .pinned_at
                        .is_some_and(|at| at.elapsed() >= LOOKUP_PIN_GRACE)
            })
            .map(|(ino, _)| *ino)
            .collect();
        for ino in unopened {
            self.unpin(ino);
        }
        self.views().retain(|_, view| {
            view.opens > 0
                || view.pinned_at.is_some()
                || view.last_used.elapsed() < IDLE_VIEW_FORGET
        });
        self.views()
            .iter()
            .filter(|(_, view)| view.pinned_at.is_some())
            .map(|(ino, view)| (self.view_key(*ino), view.dataset.clone()))
            .collect()
    }
}
