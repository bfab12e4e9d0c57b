//! hotpot for programs: user-level locks and barriers served by the dispatcher.
//!
//! Release consistency: a program commits its stores (msync) before it releases a lock, and
//! a commit returns only once every node's copy is updated and its kernel cache dropped; so an
//! acquire that follows a release sees everything committed before it.
//!
//! ```no_run
//! # fn main() -> Result<(), hotpot_client::Error> {
//! let secret = hotpot_net::Secret::load(std::path::Path::new("/var/lib/hotpot/secret")).unwrap();
//! let coordinator = hotpot_client::Coordinator::connect("127.0.0.1:7000", secret, 1, 42);
//! {
//!     let _guard = coordinator.lock("orders-counter")?;
//!     // load, store, msync(MS_SYNC) ...
//! } // released here
//! coordinator.barrier("phase-1", 3)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::{FsError, NodeId};
use hotpot_net::{Client, Secret};
use rand::Rng;

/// How long `lock` and `barrier` keep trying before they give up.
pub const WAIT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dispatcher: {0}")]
    Net(#[from] hotpot_net::NetError),
    #[error("{0}")]
    Refused(FsError),
    #[error("gave up after {0:?}: {1}")]
    TimedOut(Duration, String),
    #[error("unexpected reply {0}")]
    Unexpected(String),
}

/// One program's handle on the cluster's locks and barriers. `node` is the node the program
/// runs on (its locks are reclaimed if that node dies), `member` tells programs apart.
pub struct Coordinator {
    dispatcher: Client,
    holder: (NodeId, u64),
    rounds: Mutex<HashMap<String, u64>>,
}

/// A held lock; released when dropped.
pub struct LockGuard<'a> {
    coordinator: &'a Coordinator,
    name: String,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let request = DispatcherRequest::LockRelease {
            name: self.name.clone(),
            holder: self.coordinator.holder,
        };
        // A release that does not arrive is reclaimed when this node stops heartbeating.
        let _ = self.coordinator.ask(&request);
    }
}

impl Coordinator {
    pub fn connect(dispatcher: &str, secret: Secret, node: NodeId, member: u64) -> Coordinator {
        Coordinator {
            dispatcher: Client::new(dispatcher.to_string(), secret),
            holder: (node, member),
            rounds: Mutex::new(HashMap::new()),
        }
    }

    fn ask(&self, request: &DispatcherRequest) -> Result<DispatcherReply, Error> {
        match self.dispatcher.call(request, hotpot_net::DEFAULT_TIMEOUT)? {
            DispatcherReply::Failed(error) => Err(Error::Refused(error)),
            reply => Ok(reply),
        }
    }

    /// Wait (polling with a short random backoff) until `name` is ours.
    pub fn lock(&self, name: &str) -> Result<LockGuard<'_>, Error> {
        let started = Instant::now();
        let request = DispatcherRequest::LockAcquire {
            name: name.to_string(),
            holder: self.holder,
        };
        let mut pause_us = 50u64;
        loop {
            match self.ask(&request) {
                Ok(DispatcherReply::Done) => {
                    return Ok(LockGuard {
                        coordinator: self,
                        name: name.to_string(),
                    })
                }
                Err(Error::Refused(FsError::Busy(why))) => {
                    if started.elapsed() > WAIT_LIMIT {
                        return Err(Error::TimedOut(WAIT_LIMIT, why));
                    }
                    std::thread::sleep(Duration::from_micros(
                        rand::rng().random_range(0..=pause_us),
                    ));
                    pause_us = (pause_us * 2).min(2_000);
                }
                Ok(other) => return Err(Error::Unexpected(format!("{other:?}"))),
                Err(error) => return Err(error),
            }
        }
    }

    /// Wait until `parties` members (this one included) have reached barrier `name`.
    pub fn barrier(&self, name: &str, parties: u32) -> Result<(), Error> {
        let round = *self
            .rounds
            .lock()
            .expect("rounds lock")
            .entry(name.to_string())
            .or_insert(0);
        let request = DispatcherRequest::Barrier {
            name: name.to_string(),
            parties,
            member: self.holder,
            round,
        };
        let started = Instant::now();
        loop {
            match self.ask(&request)? {
                DispatcherReply::Done => break,
                DispatcherReply::Waiting if started.elapsed() < WAIT_LIMIT => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                DispatcherReply::Waiting => {
                    return Err(Error::TimedOut(WAIT_LIMIT, format!("barrier {name}")))
                }
                other => return Err(Error::Unexpected(format!("{other:?}"))),
            }
        }
        *self
            .rounds
            .lock()
            .expect("rounds lock")
            .get_mut(name)
            .expect("round") += 1;
        Ok(())
    }
}
