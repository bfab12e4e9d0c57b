//! FUSE adapter for hotpot (fuser). Thin: each handler makes one `Engine` call and maps its
//! typed error to an errno; no protocol logic lives here. Handlers run on several threads;
//! kernel cache invalidations run on their own thread, because invalidating a dirty page
//! makes the kernel send a WRITE that a request thread would have to serve.

mod adapter;
mod invalidate;

pub use adapter::{mount, MountConfig};
pub use invalidate::Invalidator;

use hotpot_core::proto::types::{Attr, AttrChanges, DirEntry, FsError, Ino};

/// Space numbers for `statfs`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Space {
    pub pages_total: u64,
    pub pages_free: u64,
    pub files: u64,
}

/// What a node offers the file system. Every method is one request's worth of work.
pub trait Engine: Send + Sync + 'static {
    fn lookup(&self, parent: Ino, name: &str) -> Result<Attr, FsError>;
    fn getattr(&self, ino: Ino) -> Result<Attr, FsError>;
    fn setattr(&self, ino: Ino, changes: AttrChanges) -> Result<Attr, FsError>;
    fn mkdir(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError>;
    /// Create (or, unless `exclusive`, open) a file in `parent`.
    fn create(
        &self,
        parent: Ino,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<Attr, FsError>;
    fn symlink(
        &self,
        parent: Ino,
        name: &str,
        target: &str,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError>;
    fn readlink(&self, ino: Ino) -> Result<String, FsError>;
    fn unlink(&self, parent: Ino, name: &str) -> Result<(), FsError>;
    fn rmdir(&self, parent: Ino, name: &str) -> Result<(), FsError>;
    fn rename(
        &self,
        parent: Ino,
        name: &str,
        new_parent: Ino,
        new_name: &str,
    ) -> Result<(), FsError>;
    fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>, FsError>;
    /// A file is opened; `write` when it may be written through this handle.
    fn open(&self, ino: Ino, write: bool) -> Result<(), FsError>;
    /// The last reference of one `open` is gone (every descriptor copy closed, every
    /// mapping unmapped). A handle that could write commits what this node staged.
    fn release(&self, ino: Ino, write: bool);
    fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, FsError>;
    /// Stage bytes; they become durable and visible elsewhere only at `commit`.
    fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32, FsError>;
    /// The commit point (fsync, msync(MS_SYNC), close): returns only when the commit holds.
    fn commit(&self, ino: Ino) -> Result<(), FsError>;
    fn space(&self) -> Space;
    /// Whether the kernel may cache the lookup of `name` for a while; a name that must be
    /// resolved anew at every open (a view of the latest version) may not.
    fn name_is_stable(&self, _name: &str) -> bool {
        true
    }
    /// Called once the kernel connection exists, with the handle for cache invalidations.
    fn attach_invalidator(&self, invalidator: Invalidator);
}
