//! The fuser `Filesystem` over an `Engine`.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use hotpot_core::proto::types::{Attr, AttrChanges, FsError, Kind};

use crate::{Engine, Invalidator};

/// How long the kernel may cache attributes and names. Short: other nodes change them.
const TTL: Duration = Duration::from_secs(1);
/// File handles carry whether the open may write.
const FH_WRITE: u64 = 1;

pub struct MountConfig {
    /// Request threads.
    pub threads: usize,
    /// Source name shown in /proc/mounts (the tools find the dispatcher through it).
    pub source: String,
    /// Allow other users (not only the mounting user) to use the mount.
    pub allow_other: bool,
}

/// Mount `engine` at `mountpoint`; returns when the mount is live. Unmounts when the
/// returned session is dropped.
pub fn mount<E: Engine>(
    engine: Arc<E>,
    mountpoint: &Path,
    config: &MountConfig,
) -> std::io::Result<fuser::BackgroundSession> {
    let mut options = Config::default();
    options.mount_options = vec![
        MountOption::FSName(config.source.clone()),
        MountOption::Subtype("hotpot".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if config.allow_other {
        options.acl = fuser::SessionACL::All;
    }
    options.n_threads = Some(config.threads.max(1));
    options.clone_fd = true;
    let session = fuser::Session::new(
        Adapter {
            engine: engine.clone(),
        },
        mountpoint,
        &options,
    )?;
    engine.attach_invalidator(Invalidator::start(session.notifier()));
    session.spawn()
}

struct Adapter<E: Engine> {
    engine: Arc<E>,
}

fn errno(error: FsError) -> Errno {
    Errno::from_i32(error.errno())
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: time(attr.atime_ns),
        mtime: time(attr.mtime_ns),
        ctime: time(attr.ctime_ns),
        crtime: time(attr.ctime_ns),
        kind: file_type(attr.kind),
        perm: (attr.mode & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Directory => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

/// Names from the kernel are bytes; hotpot names are UTF-8.
fn name_of(name: &OsStr) -> Result<&str, Errno> {
    if name.len() > hotpot_core::proto::types::NAME_MAX_BYTES {
        return Err(Errno::ENAMETOOLONG);
    }
    name.to_str().ok_or(Errno::EINVAL)
}

fn unix_ns(time: TimeOrNow) -> u64 {
    let at = match time {
        TimeOrNow::SpecificTime(at) => at,
        TimeOrNow::Now => SystemTime::now(),
    };
    at.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0)
}

fn writes(flags: OpenFlags) -> bool {
    flags.acc_mode() != OpenAccMode::O_RDONLY
}

impl<E: Engine> Filesystem for Adapter<E> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // One page per READ: a fault fetches only the page it needs.
        let _ = config.set_max_readahead(4096);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_of(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        let ttl = if self.engine.name_is_stable(name) {
            TTL
        } else {
            Duration::ZERO
        };
        match self.engine.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&ttl, &file_attr(&attr), Generation(0)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.engine.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let changes = AttrChanges {
            mode,
            uid,
            gid,
            size,
            atime_ns: atime.map(unix_ns),
            mtime_ns: mtime.map(unix_ns),
        };
        match self.engine.setattr(ino.0, changes) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match name_of(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        match self
            .engine
            .mkdir(parent.0, name, mode & !umask, req.uid(), req.gid())
        {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name = match name_of(link_name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        let Some(target) = target.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        match self
            .engine
            .symlink(parent.0, name, target, req.uid(), req.gid())
        {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.engine.readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_of(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        match self.engine.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_of(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        match self.engine.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags != RenameFlags::empty() {
            // RENAME_EXCHANGE / RENAME_NOREPLACE are not offered.
            return reply.error(Errno::EINVAL);
        }
        let (name, new_name) = match (name_of(name), name_of(new_name)) {
            (Ok(name), Ok(new_name)) => (name, new_name),
            (Err(error), _) | (_, Err(error)) => return reply.error(error),
        };
        match self.engine.rename(parent.0, name, new_parent.0, new_name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = writes(flags);
        match self.engine.open(ino.0, write) {
            Ok(()) => reply.opened(
                FileHandle(if write { FH_WRITE } else { 0 }),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.engine.read(ino.0, offset, size) {
            Ok(bytes) => reply.data(&bytes),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.engine.write(ino.0, offset, data) {
            Ok(written) => reply.written(written),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // FLUSH comes at every close of any copy of the descriptor, including the copies a
        // forked child closes at exec: committing here would commit bytes the program never
        // asked to commit. The commit points are FSYNC and the last RELEASE.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.engine.release(ino.0, fh.0 & FH_WRITE != 0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.engine.commit(ino.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(errno(error)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.engine.readdir(ino.0) {
            Ok(entries) => entries,
            Err(error) => return reply.error(errno(error)),
        };
        let dots = [
            (ino.0, FileType::Directory, "."),
            (ino.0, FileType::Directory, ".."),
        ];
        let all = dots.into_iter().chain(
            entries
                .iter()
                .map(|entry| (entry.ino, file_type(entry.kind), entry.name.as_str())),
        );
        for (index, (child, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are durable at the dispatcher before they are acknowledged.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let space = self.engine.space();
        reply.statfs(
            space.pages_total,
            space.pages_free,
            space.pages_free,
            space.files,
            u64::from(u32::MAX),
            4096,
            hotpot_core::proto::types::NAME_MAX_BYTES as u32,
            4096,
        );
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // ENOSYS tells the kernel once and for all that there are no extended attributes,
        // so it stops asking (it would otherwise ask for security.capability on every write).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match name_of(name) {
            Ok(name) => name,
            Err(error) => return reply.error(error),
        };
        let exclusive = flags & libc::O_EXCL != 0;
        let attr = match self.engine.create(
            parent.0,
            name,
            mode & !umask,
            req.uid(),
            req.gid(),
            exclusive,
        ) {
            Ok(attr) => attr,
            Err(error) => return reply.error(errno(error)),
        };
        let write = writes(OpenFlags(flags));
        if let Err(error) = self.engine.open(attr.ino, write) {
            return reply.error(errno(error));
        }
        reply.created(
            &TTL,
            &file_attr(&attr),
            Generation(0),
            FileHandle(if write { FH_WRITE } else { 0 }),
            FopenFlags::FOPEN_KEEP_CACHE,
        );
    }
}
