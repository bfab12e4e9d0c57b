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
        NodeRequest::FetchCopy { dataset, page } => protocol.serve_copy(dataset, page),
        NodeRequest::Commit {
            dataset,
            ino,
            committer,
            committer_prepared,
            pages,
        } => match protocol.owner_commit(&dataset, ino, committer, committer_prepared, &pages) {
            Ok(versions) => NodeReply::Committed { versions },
            Err(error) => NodeReply::Failed(error),
        },
        NodeRequest::Prepare {
            tx,
            dataset,
            committer,
            pages,
        } => protocol.serve_prepare(tx, dataset, committer, &pages),
        NodeRequest::Decide { tx, ino } => protocol.serve_decide(tx, ino),
        NodeRequest::Abort { tx } => protocol.serve_abort(tx),
        NodeRequest::Lock { tx, dataset, pages } => protocol.serve_lock(tx, dataset, &pages),
        NodeRequest::Unlock { tx, dataset, pages } => protocol.serve_unlock(tx, dataset, &pages),
        NodeRequest::CommitRuns {
            tx,
            dataset,
            ino,
            committer,
            pages,
            release,
        } => match protocol.commit_runs(tx, &dataset, ino, committer, &pages, release) {
            Ok(versions) => NodeReply::Committed { versions },
            Err(error) => NodeReply::Failed(error),
        },
    }
}
