//! The machine on its own: its commit of staged pages (`Op::Commit`, the daemon's msync),
//! what it sends and what is left staged after each end; and a holder's copies when their
//! owner restarts or is replaced. Also the helpers the other modules' tests share (a node
//! of one dataset, a one-node home and its commits).

use std::collections::BTreeMap;

use super::{Config, Input, Machine, Op, OpDone, OpResult, Output};
use crate::page::{PageTable, Run};
use crate::pm::{SimRegion, PAGE_BYTES};
use crate::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use crate::proto::types::{Dataset, DatasetParams, FsError, Mode, NodeId};

const DATASET: u64 = 1;

/// Node 1 of `nodes`, started on a new pool; `owners` own the chunks of one dataset of
/// 4 pages (one copy); the dispatcher's blocks hold `version_block` versions.
pub(super) fn node_one(
    mode: Mode,
    nodes: Vec<NodeId>,
    owners: Vec<NodeId>,
    version_block: u64,
) -> (Machine, Dataset) {
    let region = SimRegion::from_image(vec![0u8; 4 << 20]);
    let table = PageTable::open(Box::new(region), 1, 1).unwrap().0;
    let dataset = Dataset {
        id: DATASET,
        params: DatasetParams {
            mode,
            replicas: 1,
            chunk_pages: 4,
        },
        owners,
        first_home: None,
    };
    let config = Config {
        id: 1,
        incarnation: 1,
        nodes,
        datasets: vec![dataset.clone()],
        rebuilding: false,
        successors: BTreeMap::new(),
        timing: Default::default(),
        version_block,
        one_sided: false,
        bugs: Default::default(),
    };
    (Machine::start(config, table, 0).unwrap(), dataset)
}

/// Node 1 of two; node 2 owns every page.
fn committer() -> Machine {
    node_one(Mode::Mrmw, vec![1, 2], vec![2], 4).0
}

pub(super) fn done(outputs: &[Output]) -> Option<OpResult> {
    outputs.iter().find_map(|output| match output {
        Output::Done(OpDone { result, .. }) => Some(result.clone()),
        _ => None,
    })
}

/// A one-node cluster: node 1 owns (and is the home of) an MRMW dataset of 4 pages, and
/// takes blocks of 2 versions.
pub(super) fn home() -> (Machine, Dataset) {
    node_one(Mode::Mrmw, vec![1], vec![1], 2)
}

pub(super) fn commit(
    machine: &mut Machine,
    dataset: &Dataset,
    now_ms: u64,
    seq: u64,
) -> Vec<Output> {
    let request = NodeRequest::CommitRuns {
        tx: (1, 1_000 + seq),
        followers: Vec::new(),
        dataset: dataset.clone(),
        ino: 0,
        committer: 1,
        pages: vec![(
            0,
            vec![Run {
                offset: 0,
                bytes: vec![seq as u8; 8],
            }],
        )],
        release: true,
    };
    let call = 500 + seq;
    machine.handle(
        now_ms,
        Input::Request {
            from: 1,
            call,
            request,
        },
    )
}

pub(super) fn block_call(outputs: &[Output]) -> Option<u64> {
    outputs.iter().find_map(|output| match output {
        Output::AskDispatcher {
            call,
            request: DispatcherRequest::VersionBlock { dataset: 1, .. },
        } => Some(*call),
        _ => None,
    })
}

/// The dispatcher answers block request `call` with the block starting at `start`.
pub(super) fn grant_block(
    machine: &mut Machine,
    now_ms: u64,
    call: u64,
    start: u64,
) -> Vec<Output> {
    let reply = DispatcherReply::VersionBlock { start };
    machine.handle(now_ms, Input::DispatcherReply { call, reply })
}

pub(super) fn answer(outputs: &[Output]) -> Option<NodeReply> {
    outputs.iter().find_map(|output| match output {
        Output::Reply { reply, .. } => Some(reply.clone()),
        _ => None,
    })
}

pub(super) fn committed_at(reply: Option<NodeReply>) -> u64 {
    match reply {
        Some(NodeReply::Committed {
            dataset_version, ..
        }) => dataset_version,
        other => panic!("not committed: {other:?}"),
    }
}

/// Stage `bytes` at `offset` of page 2, commit at `now_ms`; the CommitRuns call's id and
/// the bytes it carries.
fn commit_staged(
    machine: &mut Machine,
    now_ms: u64,
    offset: usize,
    bytes: &[u8],
) -> (u64, Vec<u8>) {
    machine
        .table_mut()
        .stage((DATASET, 2), offset, bytes)
        .unwrap();
    let outputs = machine.handle(
        now_ms,
        Input::Start(Op::Commit {
            op: 7,
            dataset: DATASET,
        }),
    );
    let (call, pages) = outputs
        .iter()
        .find_map(|output| match output {
            Output::Send {
                to: 2,
                call,
                request: NodeRequest::CommitRuns { pages, .. },
            } => Some((*call, pages.clone())),
            _ => None,
        })
        .expect("a CommitRuns to the owner");
    assert_eq!(pages.len(), 1, "one page staged, one page sent");
    assert_eq!(pages[0].0, 2);
    let sent: Vec<u8> = pages[0]
        .1
        .iter()
        .flat_map(|run| run.bytes.clone())
        .collect();
    assert_eq!(
        pages[0].1[0].offset as usize, offset,
        "the run starts where the write did"
    );
    (call, sent)
}

#[test]
fn a_committed_msync_sends_the_staged_bytes_and_leaves_the_page_clean() {
    let mut machine = committer();
    let (call, sent) = commit_staged(&mut machine, 10, 100, &[7, 8, 9]);
    assert_eq!(sent, vec![7, 8, 9], "the bytes written, nothing else");
    let reply = NodeReply::Committed {
        versions: vec![1],
        dataset_version: 9,
    };
    let outputs = machine.handle(
        20,
        Input::Reply {
            from: 2,
            call,
            reply,
        },
    );
    let (pages, mark) = dropping(&outputs)
        .expect("the kernel's copy of the page lacks the other writers' bytes: invalidated");
    assert_eq!(pages, vec![2]);
    assert_eq!(
        done(&outputs),
        None,
        "not before the kernel dropped its copy"
    );
    let outputs = machine.handle(
        21,
        Input::Invalidated {
            dataset: DATASET,
            pages,
            mark,
        },
    );
    assert_eq!(
        done(&outputs),
        Some(OpResult::Committed { dataset_version: 9 }),
        "acknowledged with the version the owner gave"
    );
    assert!(machine.table().dirty_pages(DATASET).is_empty());
}

/// The pages and mark of the kernel invalidation among `outputs`.
fn dropping(outputs: &[Output]) -> Option<(Vec<u64>, u64)> {
    outputs.iter().find_map(|output| match output {
        Output::Invalidate {
            dataset: DATASET,
            pages,
            mark,
        } => Some((pages.clone(), *mark)),
        _ => None,
    })
}

/// Carry out what a one-node cluster's machine sends itself (its calls to itself, the
/// dispatcher's blocks of versions); the rest of the outputs.
fn pump_alone(machine: &mut Machine, now_ms: u64, outputs: Vec<Output>) -> Vec<Output> {
    let mut queue: std::collections::VecDeque<Output> = outputs.into();
    let mut rest = Vec::new();
    let mut next_block = 1;
    while let Some(output) = queue.pop_front() {
        let input = match output {
            Output::Send {
                to: 1,
                call,
                request,
            } => Input::Request {
                from: 1,
                call,
                request,
            },
            Output::Reply { to: 1, call, reply } => Input::Reply {
                from: 1,
                call,
                reply,
            },
            Output::AskDispatcher {
                call,
                request: DispatcherRequest::VersionBlock { .. },
            } => {
                next_block += 8;
                let reply = DispatcherReply::VersionBlock {
                    start: next_block - 8,
                };
                Input::DispatcherReply { call, reply }
            }
            other => {
                rest.push(other);
                continue;
            }
        };
        queue.extend(machine.handle(now_ms, input));
    }
    rest
}

/// The kernel's copy of page 2 with `byte` in its first 8 bytes, written back unsynced.
fn write_back(machine: &mut Machine, now_ms: u64, op: u64, byte: u8) -> Vec<Output> {
    let mut page = vec![0u8; PAGE_BYTES];
    page[..8].fill(byte);
    let write_back = Op::WriteBack {
        op,
        dataset: DATASET,
        pages: vec![(2, page)],
        msync: false,
    };
    let outputs = machine.handle(now_ms, Input::Start(write_back));
    pump_alone(machine, now_ms, outputs)
}

/// A real kernel writes a dirty copy back as it drops it: after the commit that took the
/// copy's earlier bytes, and before it hears the copy is gone. A store made meanwhile that
/// puts the page's old bytes back is a change to the committed page, and the next commit
/// sends it (a commit that settled before the drop diffed it against the copy's base, the
/// old bytes, and lost it: LMDB's reader table, clearing a reader's slot, under
/// `hotpot node --machine`).
#[test]
fn a_copy_the_kernel_writes_back_as_it_drops_it_keeps_a_store_that_restores_old_bytes() {
    let (mut machine, _) = home();
    pump_alone(&mut machine, 0, Vec::new());
    let zeros = vec![0u8; PAGE_BYTES];
    machine
        .table_mut()
        .read_fetched((DATASET, 2), 0, zeros)
        .unwrap();
    assert_eq!(
        done(&write_back(&mut machine, 1, 5, 7)),
        Some(OpResult::Staged)
    );
    let commit = |op| {
        Input::Start(Op::Commit {
            op,
            dataset: DATASET,
        })
    };
    let outputs = machine.handle(2, commit(6));
    let outputs = pump_alone(&mut machine, 2, outputs);
    let (pages, mark) = dropping(&outputs).expect("the kernel's copy goes");
    assert_eq!(
        done(&outputs),
        None,
        "not before the kernel dropped its copy"
    );
    // The program cleared its 7s before the kernel dropped the page, which it writes back.
    assert_eq!(
        done(&write_back(&mut machine, 4, 8, 0)),
        Some(OpResult::Staged)
    );
    let dropped = Input::Invalidated {
        dataset: DATASET,
        pages,
        mark,
    };
    let outputs = machine.handle(5, dropped);
    let outputs = pump_alone(&mut machine, 5, outputs);
    assert!(matches!(done(&outputs), Some(OpResult::Committed { .. })));
    // The next commit takes the cleared bytes.
    let outputs = machine.handle(6, commit(9));
    pump_alone(&mut machine, 6, outputs);
    let (version, bytes) = machine
        .table()
        .read_persisted((DATASET, 2))
        .expect("the owner's copy");
    assert_eq!(
        (version, &bytes[..8]),
        (2, &[0u8; 8][..]),
        "committed twice, cleared"
    );
}

#[test]
fn an_msync_the_owner_did_not_answer_leaves_the_writes_staged_for_the_next() {
    let mut machine = committer();
    commit_staged(&mut machine, 10, 0, &[1; 16]);
    let timeout = machine.config.timing.call_timeout_ms;
    let outputs = machine.handle(10 + timeout, Input::Tick);
    assert!(
        matches!(done(&outputs), Some(OpResult::InDoubt(_))),
        "no answer: in doubt"
    );
    assert_eq!(machine.table().dirty_pages(DATASET), vec![2]);
    // The next msync sends them again.
    let (_, sent) = commit_staged(&mut machine, 20 + timeout, 0, &[1; 16]);
    assert_eq!(sent, vec![1; 16]);
}

/// The dispatcher's view, with every node live and how many times each joined.
fn view(incarnations: &[(NodeId, u64)]) -> Input {
    Input::View {
        live: incarnations.iter().map(|(node, _)| *node).collect(),
        successors: BTreeMap::new(),
        incarnations: incarnations.iter().copied().collect(),
    }
}

/// Whether `outputs` register this node's copies with `owner` (a `Register` with no commit).
fn registers_with(outputs: &[Output], owner: NodeId) -> bool {
    outputs.iter().any(|output| {
        matches!(
            output,
            Output::Send {
                to,
                request: NodeRequest::Register { tx: None, .. },
                ..
            } if *to == owner
        )
    })
}

#[test]
fn a_holder_registers_its_copies_again_with_an_owner_that_restarted() {
    let mut machine = committer();
    let bytes = vec![7u8; crate::pm::PAGE_BYTES];
    machine
        .table_mut()
        .install_copy((DATASET, 2), 1, &bytes)
        .unwrap();
    let outputs = machine.handle(10, view(&[(1, 1), (2, 1)]));
    assert!(
        !registers_with(&outputs, 2),
        "nothing to tell an owner that did not restart"
    );
    // Node 2 restarted: its rejoin may not have heard from this node.
    let outputs = machine.handle(20, view(&[(1, 1), (2, 2)]));
    assert!(
        registers_with(&outputs, 2),
        "copies registered again: {outputs:?}"
    );
    // Until the owner confirms them, the page is read through it.
    let outputs = machine.handle(
        30,
        Input::Start(Op::Read {
            op: 8,
            dataset: DATASET,
            page: 2,
        }),
    );
    assert!(
        outputs.iter().any(|output| matches!(
            output,
            Output::Send {
                to: 2,
                request: NodeRequest::Fetch { page: 2, .. },
                ..
            }
        )),
        "read through the owner: {outputs:?}"
    );
    assert_eq!(done(&outputs), None);
}

/// A read of page 2 started at `now_ms`: the node it asks for the page, if any, and
/// whether it ended at once (from this node's own copy).
fn read_page_two(machine: &mut Machine, now_ms: u64, op: u64) -> (Option<NodeId>, bool) {
    let outputs = machine.handle(
        now_ms,
        Input::Start(Op::Read {
            op,
            dataset: DATASET,
            page: 2,
        }),
    );
    let asked = outputs.iter().find_map(|output| match output {
        Output::Send {
            to,
            request: NodeRequest::Fetch { page: 2, .. },
            ..
        } => Some(*to),
        _ => None,
    });
    (asked, done(&outputs).is_some())
}

#[test]
fn a_copy_waiting_for_a_lost_owner_waits_for_its_successor() {
    // Node 2 owns every page; node 3 is promoted in its place below.
    let (mut machine, _) = node_one(Mode::Mrmw, vec![1, 2, 3], vec![2], 4);
    machine
        .table_mut()
        .install_copy((DATASET, 2), 1, &[7u8; crate::pm::PAGE_BYTES])
        .unwrap();
    machine.handle(10, view(&[(1, 1), (2, 1), (3, 1)]));
    machine.handle(20, view(&[(1, 1), (2, 2), (3, 1)]));
    assert_eq!(read_page_two(&mut machine, 30, 8), (Some(2), false));
    // Node 2 lost before it confirmed this node's copy: the copy may have missed its
    // commits, so the page is read through its successor until that one confirms it.
    machine.handle(
        40,
        Input::View {
            live: [1, 3].into(),
            successors: [(2, 3)].into(),
            incarnations: [(1, 1), (2, 2), (3, 1)].into(),
        },
    );
    let outputs = machine.handle(45, Input::Tick);
    assert!(
        registers_with(&outputs, 3),
        "copies registered with the successor: {outputs:?}"
    );
    assert_eq!(read_page_two(&mut machine, 50, 9), (Some(3), false));
}

/// Node 1 of two, owning every page, just started: its rejoin asks node 2 for its copies
/// (the call id returned) and it serves as no owner until node 2 answers.
fn rejoining_owner() -> (Machine, u64) {
    let (mut machine, _) = node_one(Mode::Mrmw, vec![1, 2], vec![1], 4);
    let outputs = machine.handle(0, Input::Tick);
    let asked = outputs
        .iter()
        .find_map(|output| match output {
            Output::Send {
                to: 2,
                call,
                request: NodeRequest::FetchCopies { .. },
            } => Some(*call),
            _ => None,
        })
        .expect("the rejoin asks node 2 for its copies");
    assert!(!machine.is_ready());
    (machine, asked)
}

/// Node 2 asks node 1 (call `call`) for `request`.
fn asks(machine: &mut Machine, now_ms: u64, call: u64, request: NodeRequest) -> Vec<Output> {
    machine.handle(
        now_ms,
        Input::Request {
            from: 2,
            call,
            request,
        },
    )
}

fn fetch_page_zero() -> NodeRequest {
    NodeRequest::Fetch {
        dataset: DATASET,
        page: 0,
        from: 2,
    }
}

/// This machine's answer to call `call`, if `outputs` hold it.
fn answer_to(outputs: &[Output], call: u64) -> Option<NodeReply> {
    outputs.iter().find_map(|output| match output {
        Output::Reply { call: c, reply, .. } if *c == call => Some(reply.clone()),
        _ => None,
    })
}

#[test]
fn a_read_at_a_rejoining_owner_waits_for_the_rejoin_to_end() {
    let (mut machine, asked) = rejoining_owner();
    let outputs = asks(&mut machine, 10, 77, fetch_page_zero());
    assert_eq!(
        answer_to(&outputs, 77),
        None,
        "waits, as the daemon's wait_ready does"
    );
    let rejoined = Input::Reply {
        from: 2,
        call: asked,
        reply: NodeReply::Pages(Vec::new()),
    };
    let outputs = machine.handle(20, rejoined);
    assert!(machine.is_ready());
    match answer_to(&outputs, 77) {
        Some(NodeReply::Page(copy)) => assert_eq!((copy.page, copy.version), (0, 0)),
        other => panic!("the read is served once the rejoin is over: {other:?}"),
    }
}

#[test]
fn a_read_at_an_owner_rejoining_too_long_is_refused() {
    let (mut machine, _) = rejoining_owner();
    let outputs = asks(&mut machine, 10, 77, fetch_page_zero());
    assert_eq!(answer_to(&outputs, 77), None);
    let outputs = machine.handle(2_999 + 10, Input::Tick);
    assert_eq!(answer_to(&outputs, 77), None, "within ready_wait_ms");
    let outputs = machine.handle(3_000 + 10, Input::Tick);
    match answer_to(&outputs, 77) {
        Some(NodeReply::Failed(FsError::Io(why))) => {
            assert!(why.contains("still rejoining"), "{why}")
        }
        other => panic!("refused after ready_wait_ms: {other:?}"),
    }
}

#[test]
fn a_registration_at_a_rejoining_owner_is_refused_at_once() {
    let (mut machine, _) = rejoining_owner();
    let register = NodeRequest::Register {
        dataset: DATASET,
        from: 2,
        pages: Vec::new(),
        tx: None,
    };
    let outputs = asks(&mut machine, 10, 78, register);
    assert!(
        matches!(answer_to(&outputs, 78), Some(NodeReply::Failed(_))),
        "{outputs:?}"
    );
}

/// A rejoining owner that asks for every copy (`FetchCopies` without pages) waits while a
/// copy prepared here for a commit across owners is undecided, also of a page this node has
/// no other copy of: that commit may make it the newest.
#[test]
fn a_copy_prepared_for_a_commit_across_owners_holds_back_every_page_asked_for() {
    let mut machine = committer();
    let prepare = NodeRequest::Prepare {
        tx: (2, 7),
        owner: 2,
        commit: Some(((2, 7), 2)),
        dataset: DATASET,
        committer: false,
        pages: vec![crate::proto::messages::VersionedPage {
            page: 3,
            version: 1,
            bytes: vec![5; crate::pm::PAGE_BYTES],
        }],
    };
    let ask = |machine: &mut Machine, now_ms, call, request| {
        let input = Input::Request {
            from: 2,
            call,
            request,
        };
        answer(&machine.handle(now_ms, input))
    };
    assert_eq!(ask(&mut machine, 10, 1, prepare), Some(NodeReply::Done));
    let every = NodeRequest::FetchCopies {
        dataset: DATASET,
        pages: None,
    };
    assert!(
        matches!(
            ask(&mut machine, 20, 2, every),
            Some(NodeReply::Failed(FsError::Busy(_)))
        ),
        "every page: page 3's undecided copy holds it back"
    );
    let others = NodeRequest::FetchCopies {
        dataset: DATASET,
        pages: Some(vec![0]),
    };
    assert_eq!(
        ask(&mut machine, 30, 3, others),
        Some(NodeReply::Pages(Vec::new()))
    );
}
