//! A minimal FUSE passthrough file system (fuser) over a backing directory: the baseline that
//! measures what FUSE alone costs, with the same kernel settings as hotpot's mount (kept page
//! cache, 4 KiB readahead). Enough of POSIX for LMDB: files, directories, read/write, fsync.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

const TTL: Duration = Duration::from_secs(1);

struct State {
    paths: HashMap<u64, PathBuf>,
    files: HashMap<u64, File>,
    next_handle: u64,
}

pub struct Passthrough {
    root: PathBuf,
    state: Mutex<State>,
}

fn errno(error: std::io::Error) -> Errno {
    Errno::from_i32(error.raw_os_error().unwrap_or(libc::EIO))
}

fn attr(ino: u64, meta: &std::fs::Metadata) -> FileAttr {
    let time = |secs: i64, nanos: i64| UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos as u32);
    FileAttr {
        ino: INodeNo(ino),
        size: meta.len(),
        blocks: meta.blocks(),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: time(meta.ctime(), meta.ctime_nsec()),
        kind: if meta.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (meta.permissions().mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Passthrough {
    pub fn new(root: &Path) -> Passthrough {
        Passthrough {
            root: root.to_path_buf(),
            state: Mutex::new(State {
                paths: HashMap::from([(1, root.to_path_buf())]),
                files: HashMap::new(),
                next_handle: 1,
            }),
        }
    }

    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.state
            .lock()
            .expect("state lock")
            .paths
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// Stat `path` and remember it under its inode number (the root stays 1).
    fn entry(&self, path: PathBuf) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(&path).map_err(errno)?;
        let ino = if path == self.root { 1 } else { meta.ino() };
        self.state
            .lock()
            .expect("state lock")
            .paths
            .insert(ino, path);
        Ok(attr(ino, &meta))
    }

    fn open_handle(&self, file: File) -> FileHandle {
        let mut state = self.state.lock().expect("state lock");
        let handle = state.next_handle;
        state.next_handle += 1;
        state.files.insert(handle, file);
        FileHandle(handle)
    }

    fn with_file<T>(
        &self,
        fh: FileHandle,
        op: impl FnOnce(&File) -> std::io::Result<T>,
    ) -> Result<T, Errno> {
        let state = self.state.lock().expect("state lock");
        let file = state.files.get(&fh.0).ok_or(Errno::EBADF)?;
        op(file).map_err(errno)
    }
}

impl Filesystem for Passthrough {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(4096);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.path(parent).and_then(|dir| self.entry(dir.join(name))) {
            Ok(found) => reply.entry(&TTL, &found, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|path| self.entry(path)) {
            Ok(found) => reply.attr(&TTL, &found),
            Err(error) => reply.error(error),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.path(ino).and_then(|path| {
            if let Some(size) = size {
                File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|file| file.set_len(size))
                    .map_err(errno)?;
            }
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(errno)?;
            }
            self.entry(path)
        });
        match result {
            Ok(found) => reply.attr(&TTL, &found),
            Err(error) => reply.error(error),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.path(parent).and_then(|dir| {
            let path = dir.join(name);
            std::fs::create_dir(&path).map_err(errno)?;
            self.entry(path)
        });
        match result {
            Ok(found) => reply.entry(&TTL, &found, Generation(0)),
            Err(error) => reply.error(error),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .path(parent)
            .and_then(|dir| std::fs::remove_file(dir.join(name)).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .path(parent)
            .and_then(|dir| std::fs::remove_dir(dir.join(name)).map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.path(parent).and_then(|from| {
            let to = self.path(new_parent)?.join(new_name);
            std::fs::rename(from.join(name), &to).map_err(errno)?;
            self.entry(to).map(|_| ())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != fuser::OpenAccMode::O_RDONLY;
        let result = self.path(ino).and_then(|path| {
            File::options()
                .read(true)
                .write(write)
                .open(path)
                .map_err(errno)
        });
        match result {
            Ok(file) => reply.opened(self.open_handle(file), FopenFlags::FOPEN_KEEP_CACHE),
            Err(error) => reply.error(error),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.path(parent).and_then(|dir| {
            let path = dir.join(name);
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(errno)?;
            let _ = std::fs::set_permissions(
                &path,
                std::fs::Permissions::from_mode(mode & !umask & 0o7777),
            );
            Ok((self.entry(path)?, file))
        });
        match result {
            Ok((found, file)) => {
                let handle = self.open_handle(file);
                reply.created(
                    &TTL,
                    &found,
                    Generation(0),
                    handle,
                    FopenFlags::FOPEN_KEEP_CACHE,
                )
            }
            Err(error) => reply.error(error),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.with_file(fh, |file| {
            let mut buffer = vec![0u8; size as usize];
            let mut filled = 0;
            while filled < buffer.len() {
                let read = file.read_at(&mut buffer[filled..], offset + filled as u64)?;
                if read == 0 {
                    break;
                }
                filled += read;
            }
            buffer.truncate(filled);
            Ok(buffer)
        });
        match result {
            Ok(bytes) => reply.data(&bytes),
            Err(error) => reply.error(error),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.with_file(fh, |file| file.write_all_at(data, offset)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(error) => reply.error(error),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.lock().expect("state lock").files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.with_file(fh, |file| {
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(error),
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
        let entries = match self
            .path(ino)
            .and_then(|dir| std::fs::read_dir(dir).map_err(errno))
        {
            Ok(entries) => entries,
            Err(error) => return reply.error(error),
        };
        let mut all = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let kind = if meta.is_dir() {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            all.push((meta.ino(), kind, entry.file_name()));
        }
        for (index, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mount a passthrough of `backing` at `mountpoint`; unmounted when the session drops.
pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<fuser::BackgroundSession> {
    let mut options = Config::default();
    options.mount_options = vec![
        MountOption::FSName("passthrough".into()),
        MountOption::NoAtime,
    ];
    options.n_threads = Some(4);
    options.clone_fd = true;
    fuser::Session::new(Passthrough::new(backing), mountpoint, &options)?.spawn()
}
