//! The event trace: one line per event (`--trace`), the same bytes on every replay of a
//! seed. Lines name messages by kind, transaction and pages, never by their page bytes.

use hotpot_core::proto::messages::{
    DispatcherReply, DispatcherRequest, NodeReply, NodeRequest, OwnerPages,
};
use hotpot_core::proto::node::{Op, OpResult};

use crate::workload::{stamp_of, SLOT_BYTES};
use crate::world::Message;

/// Adds a line when the trace is on; the arguments are not even formatted otherwise.
macro_rules! trace {
    ($world:expr, $($format:tt)+) => {
        if $world.trace.is_on() {
            let line = format!($($format)+);
            $world.trace.push($world.now_ms, line);
        }
    };
}

pub struct Trace {
    lines: Option<Vec<String>>,
}

impl Trace {
    pub fn off() -> Trace {
        Trace { lines: None }
    }

    pub fn on() -> Trace {
        Trace {
            lines: Some(Vec::new()),
        }
    }

    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    pub fn push(&mut self, now_ms: u64, line: String) {
        if let Some(lines) = &mut self.lines {
            lines.push(format!("{now_ms:>7} {line}"));
        }
    }

    pub fn lines(&self) -> &[String] {
        self.lines.as_deref().unwrap_or(&[])
    }
}

pub(crate) fn describe(message: &Message) -> String {
    match message {
        Message::Request { call, request } => format!("call {call} {}", request_summary(request)),
        Message::Reply { call, reply } => format!("reply {call} {}", reply_summary(reply)),
        Message::ToDispatcher(DispatcherRequest::Heartbeat { node, .. }) => {
            format!("Heartbeat n{node}")
        }
        Message::ToDispatcher(request) => format!("dispatcher request {request:?}"),
        Message::FromDispatcher(DispatcherReply::Status {
            nodes, successors, ..
        }) => {
            let live: Vec<_> = nodes.iter().filter(|n| n.live).map(|n| n.id).collect();
            if successors.is_empty() {
                format!("dispatcher Status, live {live:?}")
            } else {
                format!("dispatcher Status, live {live:?}, promoted {successors:?}")
            }
        }
        Message::FromDispatcher(reply) => format!("dispatcher reply {reply:?}"),
        Message::DispatcherCall { call, request } => format!("dispatcher call {call} {request:?}"),
        Message::DispatcherAnswer { call, reply } => format!("dispatcher answer {call} {reply:?}"),
    }
}

fn request_summary(request: &NodeRequest) -> String {
    match request {
        NodeRequest::Fetch { dataset, page, .. } => format!("Fetch d{dataset} p{page}"),
        NodeRequest::FetchCopies { dataset, pages } => match pages {
            Some(pages) => format!("FetchCopies d{dataset} {pages:?}"),
            None => format!("FetchCopies d{dataset} all"),
        },
        NodeRequest::Version { dataset, take } => format!("Version d{} take {take}", dataset.id),
        NodeRequest::Commit {
            tx,
            followers,
            dataset,
            committer_prepared,
            pages,
            ..
        } => {
            let pages: Vec<(u64, u64)> = pages.iter().map(|w| (w.page, w.base_version)).collect();
            format!(
                "Commit tx {tx:?} d{} followers {followers:?} own-copy {committer_prepared} (page, base) {pages:?}",
                dataset.id
            )
        }
        NodeRequest::CommitRuns {
            tx, dataset, pages, ..
        } => {
            let pages: Vec<u64> = pages.iter().map(|(page, _)| *page).collect();
            format!("CommitRuns tx {tx:?} d{} pages {pages:?}", dataset.id)
        }
        NodeRequest::OwnerPrepare {
            tx,
            dataset,
            leader,
            pages,
            ..
        } => {
            let pages: Vec<u64> = match pages {
                OwnerPages::Writes(writes) => writes.iter().map(|w| w.page).collect(),
                OwnerPages::Runs(runs) => runs.iter().map(|(page, _)| *page).collect(),
            };
            format!(
                "OwnerPrepare tx {tx:?} d{} leader {leader} pages {pages:?}",
                dataset.id
            )
        }
        NodeRequest::Prepare {
            tx,
            owner,
            dataset,
            committer,
            pages,
            ..
        } => {
            let pages: Vec<(u64, u64)> = pages.iter().map(|c| (c.page, c.version)).collect();
            format!("Prepare tx {tx:?} owner {owner} d{dataset} committer {committer} {pages:?}")
        }
        NodeRequest::Decide { tx, .. } => format!("Decide tx {tx:?}"),
        NodeRequest::Abort { tx } => format!("Abort tx {tx:?}"),
        NodeRequest::Register {
            dataset, pages, tx, ..
        } => format!("Register d{dataset} {pages:?} tx {tx:?}"),
        NodeRequest::Install { dataset, pages } => {
            let pages: Vec<(u64, u64)> = pages.iter().map(|c| (c.page, c.version)).collect();
            format!("Install d{dataset} {pages:?}")
        }
        NodeRequest::Pin {
            view,
            dataset,
            version,
        } => format!("Pin view {view:?} d{} at v{version}", dataset.id),
        other => format!("{other:?}"),
    }
}

fn reply_summary(reply: &NodeReply) -> String {
    match reply {
        NodeReply::Page(copy) => format!("Page p{} v{}", copy.page, copy.version),
        NodeReply::Pages(copies) => {
            let pages: Vec<(u64, u64)> = copies.iter().map(|c| (c.page, c.version)).collect();
            format!("Pages {pages:?}")
        }
        other => format!("{other:?}"),
    }
}

pub(crate) fn describe_op(op: &Op) -> String {
    match op {
        Op::Write {
            op,
            dataset,
            stores,
            msync,
        } => {
            let pages: Vec<u64> = stores.iter().map(|(page, _, _)| *page).collect();
            let msync = if *msync { "" } else { " without msync" };
            format!("op {op} write d{dataset} pages {pages:?}{msync}")
        }
        Op::WriteBack {
            op,
            dataset,
            pages,
            msync,
        } => {
            let pages: Vec<u64> = pages.iter().map(|(page, _)| *page).collect();
            let msync = if *msync { "" } else { " (no msync)" };
            format!("op {op} write back d{dataset} pages {pages:?}{msync}")
        }
        Op::Commit { op, dataset } => format!("op {op} commit d{dataset}"),
        Op::Read { op, dataset, page } => format!("op {op} read d{dataset} p{page}"),
        Op::Latest { op, dataset } => format!("op {op} latest version of d{dataset}"),
        Op::Open { op, dataset } => format!("op {op} open d{dataset} for writing"),
        Op::Close { op, dataset } => format!("op {op} close d{dataset}"),
        Op::Pin {
            op,
            dataset,
            view,
            version,
        } => format!("op {op} pin view {view} of d{dataset} at v{version}"),
        Op::ReadAt {
            op,
            dataset,
            version,
            page,
        } => format!("op {op} read d{dataset} p{page} at v{version}"),
        Op::Unpin { op, dataset, view } => format!("op {op} unpin view {view} of d{dataset}"),
    }
}

pub(crate) fn describe_result(result: &OpResult) -> String {
    match result {
        OpResult::Read {
            version,
            failed_over: false,
            ..
        } => format!("read v{version}"),
        OpResult::Read { version, .. } => format!("read v{version} (failed over)"),
        OpResult::ReadAt { bytes } => format!(
            "read at the view's version: stamps {:?}",
            view_stamps(bytes)
        ),
        other => format!("{other:?}"),
    }
}

/// The stamps in a page's slots that are not zero, as (node, stamp).
fn view_stamps(bytes: &[u8]) -> Vec<(usize, u64)> {
    bytes
        .chunks(SLOT_BYTES)
        .enumerate()
        .filter_map(|(node, slot)| {
            let word = u64::from_le_bytes(slot[..8].try_into().ok()?);
            (word != 0).then(|| (node, stamp_of(word)))
        })
        .collect()
}
