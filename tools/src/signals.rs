//! Stop signals (SIGTERM, SIGINT) handled synchronously: blocked in every thread, awaited by
//! the main thread with sigwait.

use anyhow::Context;

pub struct StopSignals(libc::sigset_t);

/// Block SIGTERM and SIGINT in this thread and every thread it starts afterwards.
pub fn block_stop_signals() -> anyhow::Result<StopSignals> {
    // SAFETY: plain libc signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc)).context("blocking stop signals");
        }
        Ok(StopSignals(set))
    }
}

/// Wait for a stop signal; returns its number.
pub fn wait(signals: &StopSignals) -> anyhow::Result<i32> {
    let mut signal = 0;
    // SAFETY: the set was built by block_stop_signals.
    let rc = unsafe { libc::sigwait(&signals.0, &mut signal) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc)).context("waiting for a stop signal");
    }
    Ok(signal)
}
