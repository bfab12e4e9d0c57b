//! Calls to the dispatcher from a node's file system: retried while it is unreachable (it
//! may be restarting), for as long as a node keeps retrying an unreachable dispatcher.

use std::time::{Duration, Instant};

use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::FsError;
use hotpot_net::{Client, NetError};

/// How long a node keeps retrying an unreachable dispatcher before failing the request.
const DISPATCHER_RETRY_MS: u64 = 15_000;

/// Ask the dispatcher; its refusal is the error.
pub fn ask(dispatcher: &Client, request: &DispatcherRequest) -> Result<DispatcherReply, FsError> {
    let deadline = Instant::now() + Duration::from_millis(DISPATCHER_RETRY_MS);
    let mut backoff = Duration::from_millis(20);
    loop {
        match dispatcher.call::<_, DispatcherReply>(request, hotpot_net::DEFAULT_TIMEOUT) {
            Ok(DispatcherReply::Failed(error)) => return Err(error),
            Ok(reply) => return Ok(reply),
            Err(
                error @ (NetError::Connect { .. }
                | NetError::Disconnected { .. }
                | NetError::Timeout { .. }),
            ) if Instant::now() < deadline => {
                tracing::warn!(%error, "dispatcher unreachable, retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(error) => return Err(FsError::Io(format!("dispatcher: {error}"))),
        }
    }
}
