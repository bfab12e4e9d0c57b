//! The committing node's side of a commit (docs/design.md, "Recovery": commits across owners).
//! One owner: one message (MRSW `Commit` after this node prepared its own copy; MRMW
//! `CommitRuns` with lock, merge and unlock in one). Several owners: the lowest-id owner
//! leads. Phase 1 prepares every follower (MRMW: the leader's pages are locked first and
//! followers go in node-id order, a refusal undoes everything, backs off for a random,
//! growing time and starts over; MRSW: followers at once, locks wait); phase 2 is the
//! leader's commit, whose local apply decides; phase 3 tells the followers, which unlock.
//! A conflict never reaches the program: it is retried until COMMIT_RETRY_LIMIT, then EIO.
//! Must survive: this node dying between any two steps (followers ask the leader, whose
//! answer is final), an owner refusing (nothing of the commit stays), an owner that does not
//! answer the decision (EIO here; the owners settle the outcome among themselves).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hotpot_core::page::TxKey;
use hotpot_core::proto::deciders::Decider;
use hotpot_core::proto::messages::{NodeReply, NodeRequest, OwnerPages, PageWrite};
use hotpot_core::proto::types::{Dataset, FsError, Ino, NodeId};
use rand::Rng;

use super::fault;
use super::protocol::{pm_error, Protocol};
use super::service;

const COMMIT_RETRY_LIMIT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_millis(20);

/// Send `request` to `node`; this node's own requests are handled in place.
pub(super) fn ask(
    protocol: &Protocol,
    node: NodeId,
    request: NodeRequest,
) -> Result<NodeReply, FsError> {
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

/// `ask` every node at once; the answers in the same order.
fn ask_all(
    protocol: &Protocol,
    requests: Vec<(NodeId, NodeRequest)>,
) -> Vec<(NodeId, Result<NodeReply, FsError>)> {
    if requests.len() == 1 {
        return requests
            .into_iter()
            .map(|(node, request)| (node, ask(protocol, node, request)))
            .collect();
    }
    std::thread::scope(|scope| {
        let running: Vec<_> = requests
            .into_iter()
            .map(|(node, request)| (node, scope.spawn(move || ask(protocol, node, request))))
            .collect();
        running
            .into_iter()
            .map(|(node, call)| (node, call.join().expect("commit call thread")))
            .collect()
    })
}

fn backoff(attempt: u32) {
    let ceiling =
        (Duration::from_micros(100) * 2u32.saturating_pow(attempt.min(10))).min(BACKOFF_MAX);
    let pause = rand::rng().random_range(0..=ceiling.as_micros() as u64);
    std::thread::sleep(Duration::from_micros(pause));
}

/// Commit `groups` (pages by owner, all whole pages or all runs). Returns once every
/// owner has decided, or fails with nothing of the commit left behind (or, when an owner
/// did not answer the decision, with the owners settling it).
pub fn commit(
    protocol: &Protocol,
    dataset: &Dataset,
    ino: Ino,
    groups: &BTreeMap<NodeId, OwnerPages>,
) -> Result<(), FsError> {
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let tx = protocol.next_tx();
        let outcome = match (groups.len(), groups.iter().next()) {
            (1, Some((owner, OwnerPages::Writes(writes)))) => {
                one_owner_writes(protocol, tx, *owner, dataset, ino, writes)
            }
            _ => across_owners(protocol, tx, dataset, ino, groups),
        };
        match outcome {
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

/// MRSW, one owner: this node's own copy first, durable but not current: the owner counts
/// it as one of the copies, and its answer is this node's decision.
fn one_owner_writes(
    protocol: &Protocol,
    tx: TxKey,
    owner: NodeId,
    dataset: &Dataset,
    ino: Ino,
    pages: &[PageWrite],
) -> Result<(), FsError> {
    let version = protocol.writer_version(dataset)?;
    if owner == protocol.id {
        let applied =
            protocol.owner_commit(tx, &[], dataset, ino, (protocol.id, false), pages, version)?;
        return match applied.in_doubt {
            None => Ok(()),
            Some(why) => Err(in_doubt(why)),
        };
    }
    let copies: Vec<(u64, u64, &[u8])> = pages
        .iter()
        .map(|write| (write.page, write.base_version + 1, write.bytes.as_slice()))
        .collect();
    protocol
        .table()
        .prepare_copies(tx, dataset.id, &copies, true, Default::default())
        .map_err(pm_error)?;
    fault::point("committer.prepared");
    let request = NodeRequest::Commit {
        tx,
        followers: Vec::new(),
        dataset: dataset.clone(),
        ino,
        committer: protocol.id,
        committer_prepared: true,
        pages: pages.to_vec(),
        version,
    };
    let client = protocol
        .peers
        .client(owner)
        .ok_or_else(|| FsError::Io(format!("owner node {owner} is not known")));
    let reply = client.and_then(|client| {
        client
            .call::<_, NodeReply>(&request, hotpot_net::DEFAULT_TIMEOUT)
            .map_err(|error| FsError::Io(format!("node {owner}: {error}")))
    });
    fault::point("committer.answered");
    let mut table = protocol.table();
    match reply {
        Ok(NodeReply::Committed { .. }) => {
            table.decide_copies(tx);
            Ok(())
        }
        // Applied at the owner: this copy holds the decided bytes.
        Ok(NodeReply::InDoubt { why, .. }) => {
            table.decide_copies(tx);
            Err(in_doubt(why))
        }
        Ok(NodeReply::Failed(error)) => {
            table.abort_copies(tx);
            Err(error)
        }
        Ok(other) => {
            table.abort_copies(tx);
            Err(FsError::Io(format!(
                "owner {owner} answered a commit with {other:?}"
            )))
        }
        // The owner may have decided before it went silent: the copy waits, and is settled
        // with the owner (recovery.rs) before this node's next commit of the dataset.
        Err(error) => {
            drop(table);
            protocol.deciders(|deciders| {
                deciders.prepared(
                    tx,
                    Decider {
                        owner,
                        commit: None,
                    },
                )
            });
            Err(error)
        }
    }
}

fn across_owners(
    protocol: &Protocol,
    tx: TxKey,
    dataset: &Dataset,
    ino: Ino,
    groups: &BTreeMap<NodeId, OwnerPages>,
) -> Result<(), FsError> {
    // Before phase 1: a writer that cannot number its commit has nothing to undo.
    let version = protocol.writer_version(dataset)?;
    let mut owners = groups.iter();
    let (leader, leader_pages) = owners.next().expect("a commit has an owner");
    let followers: Vec<NodeId> = owners.map(|(owner, _)| *owner).collect();
    let runs = matches!(leader_pages, OwnerPages::Runs(_));
    let pages_of = |pages: &OwnerPages| -> Vec<u64> {
        match pages {
            OwnerPages::Writes(writes) => writes.iter().map(|write| write.page).collect(),
            OwnerPages::Runs(runs) => runs.iter().map(|(page, _)| *page).collect(),
        }
    };
    let unlock_leader = || {
        let request = NodeRequest::Unlock {
            tx,
            dataset: dataset.id,
            pages: pages_of(leader_pages),
        };
        if let Err(error) = ask(protocol, *leader, request) {
            tracing::warn!(leader, %error, "unlock failed; the leader's lock waits for recovery");
        }
    };
    let abort = |asked: &[NodeId]| {
        let requests = asked
            .iter()
            .map(|node| (*node, NodeRequest::OwnerAbort { tx }))
            .collect();
        for (node, result) in ask_all(protocol, requests) {
            if let Err(error) = result {
                tracing::warn!(node, %error, "abort not delivered; the follower asks the leader");
            }
        }
    };
    // MRSW: this node persists its own copy of the other owners' pages first (like the
    // one-owner path): every owner counts it and sends it no Prepare or Decide. Its own name
    // (a node may be a follower of this very commit under `tx`).
    let own_tx = protocol.next_tx();
    let own_copy: Vec<(u64, u64, &[u8])> = groups
        .iter()
        .filter(|(owner, _)| **owner != protocol.id)
        .flat_map(|(_, pages)| match pages {
            OwnerPages::Writes(writes) => writes
                .iter()
                .map(|write| (write.page, write.base_version + 1, write.bytes.as_slice()))
                .collect(),
            OwnerPages::Runs(_) => Vec::new(),
        })
        .collect();
    let committer_prepared = !runs && !own_copy.is_empty();
    if committer_prepared {
        protocol
            .table()
            .prepare_copies(own_tx, dataset.id, &own_copy, true, Default::default())
            .map_err(pm_error)?;
    }
    let drop_own_copy = || {
        if committer_prepared {
            protocol.table().abort_copies(own_tx);
        }
    };
    let prepare = |owner: NodeId| NodeRequest::OwnerPrepare {
        tx,
        dataset: dataset.clone(),
        ino,
        committer: protocol.id,
        committer_prepared,
        leader: *leader,
        pages: groups[&owner].clone(),
    };
    // Phase 1. MRMW with one owner has none: its CommitRuns locks, merges and unlocks.
    if runs && !followers.is_empty() {
        ask(
            protocol,
            *leader,
            NodeRequest::Lock {
                tx,
                dataset: dataset.id,
                pages: pages_of(leader_pages),
            },
        )?;
        let mut asked = Vec::new();
        for follower in &followers {
            asked.push(*follower);
            if let Err(error) = ask(protocol, *follower, prepare(*follower)) {
                abort(&asked);
                unlock_leader();
                return Err(error);
            }
        }
    } else if !runs {
        let requests = followers
            .iter()
            .map(|node| (*node, prepare(*node)))
            .collect();
        let failed: Vec<String> = ask_all(protocol, requests)
            .into_iter()
            .filter_map(|(node, result)| result.err().map(|error| format!("owner {node}: {error}")))
            .collect();
        if !failed.is_empty() {
            abort(&followers);
            drop_own_copy();
            return Err(FsError::Io(format!(
                "commit not prepared, nothing applied: {}",
                failed.join("; ")
            )));
        }
    }
    fault::point("committer.followers_prepared");
    // Phase 2: the leader decides.
    let request = match leader_pages {
        OwnerPages::Runs(pages) => NodeRequest::CommitRuns {
            tx,
            followers: followers.clone(),
            dataset: dataset.clone(),
            ino,
            committer: protocol.id,
            pages: pages.clone(),
            release: true,
        },
        OwnerPages::Writes(pages) => NodeRequest::Commit {
            tx,
            followers: followers.clone(),
            dataset: dataset.clone(),
            ino,
            committer: protocol.id,
            committer_prepared,
            pages: pages.clone(),
            version,
        },
    };
    let leader_call = if *leader == protocol.id {
        Ok(service::handle(protocol, request))
    } else {
        match protocol.peers.client(*leader) {
            Some(client) => client
                .call::<_, NodeReply>(&request, hotpot_net::DEFAULT_TIMEOUT)
                .map_err(|error| error.to_string()),
            None => Err(format!("leader {leader} is not known")),
        }
    };
    // Decided at the leader from here on; acknowledged only if every owner has the wanted
    // decided copies (proto/replication.rs).
    let mut doubts = Vec::new();
    let dataset_version = match leader_call {
        Ok(NodeReply::Committed {
            dataset_version, ..
        }) => dataset_version,
        Ok(NodeReply::InDoubt {
            why,
            dataset_version,
        }) => {
            doubts.push(format!("leader {leader}: {why}"));
            dataset_version
        }
        Ok(NodeReply::Failed(error)) => {
            abort(&followers);
            drop_own_copy();
            // A refusal after phase 1 is not a conflict any more (the locks were ours):
            // report it. With one owner there was no phase 1: a conflict, retried.
            return Err(match error {
                FsError::Busy(why) if !followers.is_empty() => FsError::Io(why),
                other => other,
            });
        }
        Ok(other) => {
            abort(&followers);
            drop_own_copy();
            return Err(FsError::Io(format!("leader {leader} answered {other:?}")));
        }
        Err(why) => {
            // Decided or not, the leader will say: the own copy waits for its answer.
            if committer_prepared {
                protocol.deciders(|deciders| {
                    deciders.prepared(
                        own_tx,
                        Decider {
                            owner: *leader,
                            commit: Some((tx, *leader)),
                        },
                    )
                });
            }
            return Err(FsError::Io(format!(
                "leader {leader} did not answer the decision ({why}): the owners settle it"
            )));
        }
    };
    fault::point("committer.leader_decided");
    // Phase 3.
    let requests = followers
        .iter()
        .map(|node| {
            let decide = NodeRequest::OwnerDecide {
                tx,
                version: dataset_version,
            };
            (*node, decide)
        })
        .collect();
    for (node, result) in ask_all(protocol, requests) {
        match result {
            Ok(NodeReply::Done) => {}
            Ok(NodeReply::InDoubt { why, .. }) => doubts.push(format!("follower {node}: {why}")),
            Ok(other) => doubts.push(format!("follower {node} answered {other:?}")),
            Err(error) => {
                tracing::warn!(node, %error, "a follower missed the decision; it asks the leader");
                doubts.push(format!("follower {node} missed the decision: {error}"));
            }
        }
    }
    if committer_prepared {
        protocol.table().decide_copies(own_tx);
        // A participant of its own when it owns none of the pages (see commit_locked).
        if !groups.contains_key(&protocol.id) {
            let _ = protocol.confirmations.send((*leader, tx));
        }
    }
    if doubts.is_empty() {
        Ok(())
    } else {
        Err(in_doubt(doubts.join("; ")))
    }
}

/// A commit the owners applied but cannot vouch for: fewer than the wanted copies
/// confirmed the decision (proto/replication.rs). It may survive or not; the program is told.
fn in_doubt(why: String) -> FsError {
    FsError::Io(format!("commit in doubt, not acknowledged: {why}"))
}
