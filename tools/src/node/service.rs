//! What a node serves to peers and tools: one protocol call per request.

use hotpot_core::proto::messages::{NodeReply, NodeRequest};

use super::protocol::Protocol;

pub fn handle(protocol: &Protocol, request: NodeRequest) -> NodeReply {
    match request {
        NodeRequest::PageCopies { dataset } => {
            NodeReply::PageCopies(protocol.table().page_copies(dataset))
        }
        NodeRequest::Fetch {
            dataset,
            page,
            from,
        } => protocol.serve_fetch(dataset, page, from),
        NodeRequest::Locate {
            dataset,
            page,
            from,
        } => protocol.serve_locate(dataset, page, from),
        NodeRequest::FetchCopy { dataset, page } => protocol.serve_copy(dataset, page),
        NodeRequest::FetchCopies { dataset, pages } => {
            protocol.serve_copies(dataset, pages.as_deref())
        }
        NodeRequest::Commit {
            tx,
            followers,
            dataset,
            ino,
            committer,
            committer_prepared,
            pages,
            version,
        } => match protocol.owner_commit(
            tx,
            &followers,
            &dataset,
            ino,
            (committer, committer_prepared),
            &pages,
            version,
        ) {
            Ok(applied) => applied.reply(),
            Err(error) => NodeReply::Failed(error),
        },
        NodeRequest::Prepare {
            tx,
            owner,
            commit,
            dataset,
            committer,
            pages,
        } => protocol.serve_prepare(tx, owner, commit, dataset, committer, &pages),
        NodeRequest::Decide { tx, ino } => protocol.serve_decide(tx, ino),
        NodeRequest::Abort { tx } => protocol.serve_abort(tx),
        NodeRequest::Lock { tx, dataset, pages } => protocol.serve_lock(tx, dataset, &pages),
        NodeRequest::Unlock { tx, dataset, pages } => protocol.serve_unlock(tx, dataset, &pages),
        NodeRequest::CommitRuns {
            tx,
            followers,
            dataset,
            ino,
            committer,
            pages,
            release,
        } => {
            match protocol.commit_runs(tx, &followers, &dataset, ino, committer, &pages, release) {
                Ok(applied) => applied.reply(),
                Err(error) => NodeReply::Failed(error),
            }
        }
        NodeRequest::OwnerPrepare {
            tx,
            dataset,
            ino,
            committer,
            committer_prepared,
            leader,
            pages,
        } => protocol.serve_owner_prepare(
            tx,
            &dataset,
            ino,
            (committer, committer_prepared),
            leader,
            pages,
        ),
        NodeRequest::OwnerDecide { tx, version } => {
            match protocol.finish_follower(tx, true, Some(version)) {
                None => NodeReply::Done,
                Some(why) => NodeReply::InDoubt {
                    why,
                    dataset_version: version,
                },
            }
        }
        NodeRequest::OwnerAbort { tx } => {
            protocol.finish_follower(tx, false, None);
            NodeReply::Done
        }
        NodeRequest::Outcome { tx, .. } => protocol.serve_outcome(tx),
        NodeRequest::Confirm { txs, node } => protocol.serve_confirm(&txs, node),
        NodeRequest::Pending { tx } => protocol.serve_pending(tx),
        NodeRequest::ArmFault { point } => match super::fault::arm(&point) {
            Ok(()) => NodeReply::Done,
            Err(why) => NodeReply::Failed(hotpot_core::proto::types::FsError::Invalid(why)),
        },
        NodeRequest::DecidedCommit { tx } => NodeReply::Decision(protocol.decided_commit(tx)),
        NodeRequest::Register {
            dataset,
            from,
            pages,
            tx,
        } => protocol.serve_register(dataset, from, &pages, tx),
        NodeRequest::Install { dataset, pages } => protocol.serve_install(dataset, &pages),
        NodeRequest::Version { dataset, take } => protocol.serve_version(&dataset, take),
        NodeRequest::Latest { dataset } => match protocol.latest_version(&dataset) {
            Ok(version) => NodeReply::Version(version),
            Err(error) => NodeReply::Failed(error),
        },
        NodeRequest::Pin {
            view,
            dataset,
            version,
        } => protocol.serve_pin(view, &dataset, version),
        NodeRequest::Unpin { view } => protocol.serve_unpin(view),
        NodeRequest::RenewPins { views } => protocol.serve_renew(&views),
        NodeRequest::ReadAt {
            dataset,
            version,
            pages,
        } => protocol.serve_read_at(dataset, version, &pages),
        // The thread-based protocol and the node machine do not mix in one cluster.
        NodeRequest::Call { from, .. } => {
            NodeReply::Failed(hotpot_core::proto::types::FsError::Invalid(format!(
                "node {from} runs the node machine (hotpot node --machine) and this node does not: \
                 every node of a cluster runs the same one"
            )))
        }
        NodeRequest::PinnedVersions { dataset } => NodeReply::Versions(
            protocol
                .table()
                .pinned_versions()
                .remove(&dataset)
                .unwrap_or_default(),
        ),
    }
}
