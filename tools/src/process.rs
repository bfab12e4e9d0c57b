//! A cluster's running process, held by a pidfd (pidfd_open(2), Linux 5.3 and later). A signal
//! sent through it reaches the process it was opened on even once that pid is reused (this
//! machine's pid_max is 32768, and a test suite's clusters start thousands of threads), and it
//! becomes readable only when every thread of the process has exited, when its PM file lock,
//! ports and mount are released. Listing /proc/<pid>/task to tell the same raced with the exit
//! (`cluster kill` said a node was gone, then `start-node` found it running).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

pub struct Process {
    fd: OwnedFd,
}

impl Process {
    /// The process `pid`, or `None` if there is none.
    pub fn open(pid: u32) -> Option<Process> {
        let pid = libc::pid_t::try_from(pid).ok().filter(|pid| *pid > 0)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Some(Process {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Send `signal`; false if the process has already ended.
    pub fn signal(&self, signal: i32) -> bool {
        // SAFETY: pidfd_send_signal on our own pidfd, no siginfo.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        sent == 0
    }

    /// Wait up to `timeout` for every thread of the process to exit; whether they all did.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, ms) };
            if ready > 0 {
                return true;
            }
            let interrupted = ready < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted || left.is_zero() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::Process;

    #[test]
    fn a_killed_process_is_seen_ended_and_a_running_one_is_not() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("start sleep");
        let process = Process::open(child.id()).expect("pidfd of a running child");
        assert!(!process.wait_ended(Duration::from_millis(100)));
        assert!(process.signal(libc::SIGKILL));
        assert!(process.wait_ended(Duration::from_secs(5)));
        child.wait().expect("reap the child");
        // Reaped: the pidfd still names it, and a signal no longer reaches anything.
        assert!(!process.signal(libc::SIGKILL));
    }

    #[test]
    fn no_process_no_pidfd() {
        assert!(Process::open(0).is_none());
        // Above this machine's pid_max (and the kernel's largest).
        assert!(Process::open(1 << 23).is_none());
    }
}
