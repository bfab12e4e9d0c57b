//! Kernel page-cache invalidation from a dedicated thread that serves no FUSE requests.

use crossbeam_channel::{unbounded, Receiver, Sender};
use fuser::{INodeNo, Notifier};

enum Job {
    Range { ino: u64, offset: i64, len: i64 },
    Barrier(Sender<()>),
}

/// Queue of invalidations, drained by one thread.
#[derive(Clone)]
pub struct Invalidator {
    jobs: Sender<Job>,
}

impl Invalidator {
    pub(crate) fn start(notifier: Notifier) -> Invalidator {
        let (jobs, queue) = unbounded();
        std::thread::Builder::new()
            .name("fuse-invalidate".into())
            .spawn(move || run(notifier, queue))
            .expect("start the invalidation thread");
        Invalidator { jobs }
    }

    /// Drop the kernel's cached pages of `ino` in `[offset, offset+len)` (len 0: to the end).
    pub fn invalidate(&self, ino: u64, offset: u64, len: u64) {
        let _ = self.jobs.send(Job::Range {
            ino,
            offset: offset as i64,
            len: len as i64,
        });
    }

    /// Wait until every invalidation queued before this call is done.
    pub fn flush(&self) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.jobs.send(Job::Barrier(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// `flush`, waiting at most `timeout`: whether every invalidation queued before this
    /// call is done. (The kernel drops a page only once a READ or WRITE of it that is under
    /// way ends, and that request may wait for something the caller holds back.)
    pub fn flush_within(&self, timeout: std::time::Duration) -> bool {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.jobs.send(Job::Barrier(done)).is_ok() && wait.recv_timeout(timeout).is_ok()
    }
}

fn run(notifier: Notifier, queue: Receiver<Job>) {
    for job in queue {
        match job {
            Job::Range { ino, offset, len } => {
                if let Err(error) = notifier.inval_inode(INodeNo(ino), offset, len) {
                    // ENOENT: the kernel has no such inode cached; nothing to drop.
                    if error.raw_os_error() != Some(libc::ENOENT) {
                        tracing::warn!(ino, %error, "page cache invalidation failed");
                    }
                }
            }
            Job::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}
