//! The committing node's side of an MRMW commit: phase 1 locks the pages at every owner in
//! node-id order (a refusal unlocks what was taken, backs off for a random, growing time and
//! starts over), phase 2 sends each owner the byte runs to merge, phase 3 unlocks. With one
//! owner the three phases travel in one message. A conflict never reaches the program: it
//! is retried until COMMIT_RETRY_LIMIT, then the msync fails with EIO.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hotpot_core::page::Run;
use hotpot_core::proto::messages::{NodeReply, NodeRequest};
use hotpot_core::proto::types::{Dataset, FsError, Ino, NodeId};
use rand::Rng;

use super::protocol::Protocol;
use super::service;

const COMMIT_RETRY_LIMIT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_millis(20);

/// Send `request` to `node`; this node's own requests are handled in place.
fn ask(protocol: &Protocol, node: NodeId, request: NodeRequest) -> Result<NodeReply, FsError> {
    let reply = if node == protocol.id {
        service::handle(protocol, request)
    } else {
        let client = protocol
            .peers
            .client(node)
            .ok_or_else(|| FsError::Io(format!("owner node {node} is not known")))?;
        client
            .call::<_, NodeReply>(&request, hotpot_net::DEFAULT_TIMEOUT)
            .map_err(|error| FsError::Io(format!("node {node}: {error}")))?
    };
    match reply {
        NodeReply::Failed(error) => Err(error),
        reply => Ok(reply),
    }
}

fn backoff(attempt: u32) {
    let ceiling =
        (Duration::from_micros(100) * 2u32.saturating_pow(attempt.min(10))).min(BACKOFF_MAX);
    let pause = rand::rng().random_range(0..=ceiling.as_micros() as u64);
    std::thread::sleep(Duration::from_micros(pause));
}

pub fn commit_runs(
    protocol: &Protocol,
    dataset: &Dataset,
    ino: Ino,
    groups: &BTreeMap<NodeId, Vec<(u64, Vec<Run>)>>,
) -> Result<(), FsError> {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let tx = protocol.next_tx();
        match try_once(protocol, dataset, ino, groups, tx) {
            Err(FsError::Busy(why)) => {
                if started.elapsed() > COMMIT_RETRY_LIMIT {
                    return Err(FsError::Io(format!(
                        "commit kept conflicting for {COMMIT_RETRY_LIMIT:?} ({attempt} attempts): {why}"
                    )));
                }
                attempt += 1;
                backoff(attempt);
            }
            other => return other,
        }
    }
}

fn try_once(
    protocol: &Protocol,
    dataset: &Dataset,
    ino: Ino,
    groups: &BTreeMap<NodeId, Vec<(u64, Vec<Run>)>>,
    tx: (NodeId, u64),
) -> Result<(), FsError> {
    let commit = |owner: NodeId, pages: &Vec<(u64, Vec<Run>)>, release: bool| {
        ask(
            protocol,
            owner,
            NodeRequest::CommitRuns {
                tx,
                dataset: dataset.clone(),
                ino,
                committer: protocol.id,
                pages: pages.clone(),
                release,
            },
        )
    };
    if groups.len() == 1 {
        let (owner, pages) = groups.iter().next().expect("one group");
        return commit(*owner, pages, true).map(|_| ());
    }
    let unlock = |owners: &[NodeId]| {
        for owner in owners {
            let pages = groups[owner].iter().map(|(page, _)| *page).collect();
            let request = NodeRequest::Unlock {
                tx,
                dataset: dataset.id,
                pages,
            };
            if let Err(error) = ask(protocol, *owner, request) {
                tracing::warn!(owner, %error, "unlock failed; the owner's lock waits for recovery");
            }
        }
    };
    // Phase 1, in node-id order (BTreeMap).
    let mut locked = Vec::new();
    for (owner, pages) in groups {
        let request = NodeRequest::Lock {
            tx,
            dataset: dataset.id,
            pages: pages.iter().map(|(page, _)| *page).collect(),
        };
        if let Err(error) = ask(protocol, *owner, request) {
            unlock(&locked);
            return Err(error);
        }
        locked.push(*owner);
    }
    // Phase 2.
    for (owner, pages) in groups {
        if let Err(error) = commit(*owner, pages, false) {
            unlock(&locked);
            // A refusal here is not a conflict any more (the locks were ours): report it.
            return Err(match error {
                FsError::Busy(why) => FsError::Io(why),
                other => other,
            });
        }
    }
    // Phase 3.
    unlock(&locked);
    Ok(())
}
