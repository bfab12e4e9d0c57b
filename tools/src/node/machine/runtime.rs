//! The node machine (`hotpot_core::proto::node`, the sans-IO protocol `hotpot-sim` checks) run
//! by threads, as docs/design.md's "Moving the daemon onto the machine" (step 1) lays out.
//! The machine sits in a mutex; whoever has an input for it (a FUSE thread's operation, the
//! RPC server's request, a pool thread's answer, the heartbeat's view, the tick) locks it,
//! reads the time under the lock (so inputs never go back in time), calls `handle`, and
//! carries the outputs out after unlocking. A call that blocks (a peer's, the dispatcher's,
//! the kernel's invalidation) runs on a pool thread and comes back as an input; so does a
//! call the node makes to itself, never from inside the thread carrying it. What the machine
//! hands out after an `Output::Invalidate` waits until the kernel dropped those pages (a
//! target acknowledges a commit only once its kernel holds no stale copy), but for the ends
//! of reads and writes, which a kernel request holding the pages locked may wait for, and
//! for pages such a request is under way for (the kernel drops them once it ends, and the
//! machine makes a read bring bytes no older than a copy prepared here); and for at most
//! `KERNEL_WAIT` (docs/design.md, "Moving the daemon onto the machine"). Must survive: a
//! peer that never answers (its call is failed by the machine's own timeout, and the pool
//! thread gives up after the same time), a server call the machine never answers (refused as
//! busy after the longest a request can wait in it).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use hotpot_core::page::PageTable;
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use hotpot_core::proto::node::{Input, Machine, Op, OpDone, OpId, OpResult, Output, Timing};
use hotpot_core::proto::types::{DatasetId, FsError, Ino, NodeId};
use hotpot_fs::Invalidator;
use hotpot_net::Client;

use crate::node::peers::Peers;

/// Threads carrying calls that block (to peers and the dispatcher): enough that peers that
/// do not answer, each holding one for a call timeout, leave others to go on.
const POOL_THREADS: usize = 32;
/// Tools' requests (no sender, no call number) get numbers from here, apart from the
/// machine's own (which start at an incarnation shifted by 40 bits).
const TOOL_CALLS: u64 = 1 << 62;
/// Longest a program's operation waits for the machine to end it; the machine ends every
/// operation well within it (its calls time out, its waits are bounded).
const OP_WAIT: Duration = Duration::from_secs(120);
/// Longest the outputs after an invalidation wait for the kernel to drop the pages (a
/// page whose READ entered the kernel but not yet the machine is waited for, and that READ
/// may wait for this node's answer to a Prepare).
const KERNEL_WAIT: Duration = Duration::from_millis(50);

/// The machine's bounds for a daemon: the thread-based protocol's (`RPC_TIMEOUT` 10 s,
/// `READY_WAIT` 30 s, the committer's 30 s of retries, the dispatcher's 15 s).
pub fn daemon_timing() -> Timing {
    Timing {
        call_timeout_ms: 10_000,
        lock_wait_ms: 2_000,
        ready_wait_ms: 30_000,
        resolve_after_ms: 3_000,
        rereplicate_every_ms: 500,
        commit_retry_ms: 30_000,
        dispatcher_wait_ms: 15_000,
    }
}

/// Work for a pool thread.
enum Job {
    /// A call to a peer.
    Send {
        to: NodeId,
        call: u64,
        request: NodeRequest,
    },
    /// A call to the dispatcher.
    Ask {
        call: u64,
        request: DispatcherRequest,
    },
    /// An input the machine gave itself (a call to its own node, its reply).
    Input(Input),
}

/// An operation under way: its number, where its end comes, and the pages a kernel request
/// is under way for while it runs.
struct Started {
    id: OpId,
    wait: Receiver<OpResult>,
    moving: Vec<(DatasetId, u64)>,
}

/// Pages to drop from the kernel, and the outputs that wait for it.
struct Invalidation {
    dataset: DatasetId,
    pages: Vec<u64>,
    mark: u64,
    then: Vec<Output>,
}

/// The kernel's side: the invalidation handle once mounted, and which inodes show each
/// dataset (the machine names datasets, the kernel inodes).
#[derive(Default)]
struct Kernel {
    invalidator: Option<Invalidator>,
    inodes: HashMap<DatasetId, BTreeSet<Ino>>,
}

pub struct Runtime {
    id: NodeId,
    machine: Mutex<Machine>,
    epoch: Instant,
    timing: Timing,
    peers: Arc<Peers>,
    dispatcher: Arc<Client>,
    jobs: Sender<Job>,
    invalidations: Sender<Invalidation>,
    /// Operations under way: where their end goes, and whether it waits for an
    /// invalidation before it (a commit does: its program then sees the merged pages).
    ops: Mutex<HashMap<OpId, (Sender<OpResult>, bool)>>,
    next_op: AtomicU64,
    /// Requests the server waits on, by (sender, call).
    replies: Mutex<HashMap<(NodeId, u64), Sender<NodeReply>>>,
    next_tool_call: AtomicU64,
    kernel: Mutex<Kernel>,
    /// Pages a kernel request (a READ bringing them in, a WRITE of them) is under way for:
    /// how many, and whether the kernel is to drop them once the last ends.
    in_flight: Mutex<HashMap<(DatasetId, u64), (usize, bool)>>,
}

impl Runtime {
    /// Run `machine` (started at `epoch`, the instant its start's time was read from).
    pub fn start(
        machine: Machine,
        epoch: Instant,
        timing: Timing,
        peers: Arc<Peers>,
        dispatcher: Arc<Client>,
    ) -> anyhow::Result<Arc<Runtime>> {
        let (jobs, queue) = unbounded();
        let (invalidations, invalidating) = unbounded();
        let runtime = Arc::new(Runtime {
            id: machine.id(),
            machine: Mutex::new(machine),
            epoch,
            timing,
            peers,
            dispatcher,
            jobs,
            invalidations,
            ops: Mutex::new(HashMap::new()),
            next_op: AtomicU64::new(1),
            replies: Mutex::new(HashMap::new()),
            next_tool_call: AtomicU64::new(0),
            kernel: Mutex::new(Kernel::default()),
            in_flight: Mutex::new(HashMap::new()),
        });
        for n in 0..POOL_THREADS {
            let (runtime, queue) = (runtime.clone(), queue.clone());
            std::thread::Builder::new()
                .name(format!("machine-pool-{n}"))
                .spawn(move || runtime.work(&queue))?;
        }
        let kernel = runtime.clone();
        std::thread::Builder::new()
            .name("machine-kernel".into())
            .spawn(move || kernel.invalidate(&invalidating))?;
        Ok(runtime)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        self.machine.lock().expect("machine lock")
    }

    /// One input, at the time read under the lock; its outputs carried out after.
    pub fn feed(&self, input: Input) {
        let outputs = {
            let mut machine = self.lock();
            let now_ms = self.epoch.elapsed().as_millis() as u64;
            machine.handle(now_ms, input)
        };
        self.carry_all(outputs);
    }

    /// Carry outputs out in order; from an invalidation on, the kernel's thread carries
    /// them once the kernel dropped the pages, but for the ends of operations that do not
    /// wait for it.
    fn carry_all(&self, outputs: Vec<Output>) {
        let mut outputs = outputs.into_iter();
        while let Some(output) = outputs.next() {
            let Output::Invalidate {
                dataset,
                pages,
                mark,
            } = output
            else {
                self.carry(output);
                continue;
            };
            let (now, then): (Vec<Output>, Vec<Output>) =
                outputs.partition(|output| self.carried_at_once(output));
            for output in now {
                self.carry(output);
            }
            let _ = self.invalidations.send(Invalidation {
                dataset,
                pages,
                mark,
                then,
            });
            return;
        }
    }

    /// The end of a read or write: a kernel request may hold the pages locked until it.
    fn carried_at_once(&self, output: &Output) -> bool {
        let Output::Done(done) = output else {
            return false;
        };
        let ops = self.ops.lock().expect("ops lock");
        !ops.get(&done.op).is_some_and(|(_, waits)| *waits)
    }

    /// Look at the machine (its page table, whether it is ready) between inputs.
    pub fn with<T>(&self, look: impl FnOnce(&Machine) -> T) -> T {
        look(&self.lock())
    }

    /// Change the machine's page table directly between inputs (a truncate, a dataset's
    /// drop at its last close): what the file system does to it outside the protocol.
    pub fn with_table<T>(&self, change: impl FnOnce(&mut PageTable) -> T) -> T {
        change(self.lock().table_mut())
    }

    fn carry(&self, output: Output) {
        match output {
            Output::Send { to, call, request } if to == self.id => {
                let from = self.id;
                self.queue(Job::Input(Input::Request {
                    from,
                    call,
                    request,
                }));
            }
            Output::Send { to, call, request } => self.queue(Job::Send { to, call, request }),
            Output::Reply { to, call, reply } if to == self.id => {
                let from = self.id;
                self.queue(Job::Input(Input::Reply { from, call, reply }));
            }
            Output::Reply { to, call, reply } => {
                let waiting = self
                    .replies
                    .lock()
                    .expect("replies lock")
                    .remove(&(to, call));
                // None: the server gave up on it (it answered busy already).
                if let Some(waiting) = waiting {
                    let _ = waiting.send(reply);
                }
            }
            Output::Done(OpDone { op, result }) => {
                let waiting = self.ops.lock().expect("ops lock").remove(&op);
                if let Some((waiting, _)) = waiting {
                    let _ = waiting.send(result);
                }
            }
            Output::AskDispatcher { call, request } => self.queue(Job::Ask { call, request }),
            Output::Invalidate {
                dataset,
                pages,
                mark,
            } => self.carry_all(vec![Output::Invalidate {
                dataset,
                pages,
                mark,
            }]),
            // Only a machine configured `one_sided` reads remotely, and the daemon's never
            // is (its verbs links serve two-sided calls): the read failed.
            Output::ReadRemote { to, call, .. } => self.queue(Job::Input(Input::RemoteRead {
                from: to,
                call,
                bytes: None,
            })),
        }
    }

    fn queue(&self, job: Job) {
        // The pool lives as long as the runtime (its threads hold it).
        let _ = self.jobs.send(job);
    }

    fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.timing.call_timeout_ms)
    }

    /// A pool thread: carry calls out, feeding their answers back in. A call that fails
    /// gives the machine nothing: its own timeout fails the call there.
    fn work(&self, queue: &Receiver<Job>) {
        for job in queue {
            match job {
                Job::Input(input) => self.feed(input),
                Job::Send { to, call, request } => {
                    let Some(client) = self.peers.client(to) else {
                        tracing::debug!(to, "no address for the node yet");
                        continue;
                    };
                    let wrapped = NodeRequest::Call {
                        from: self.id,
                        call,
                        request: Box::new(request),
                    };
                    match client.call::<_, NodeReply>(&wrapped, self.call_timeout()) {
                        Ok(reply) => self.feed(Input::Reply {
                            from: to,
                            call,
                            reply,
                        }),
                        Err(error) => tracing::debug!(to, %error, "call to a peer failed"),
                    }
                }
                Job::Ask { call, request } => {
                    match self
                        .dispatcher
                        .call::<_, DispatcherReply>(&request, self.call_timeout())
                    {
                        Ok(reply) => self.feed(Input::DispatcherReply { call, reply }),
                        Err(error) => tracing::debug!(%error, "call to the dispatcher failed"),
                    }
                }
            }
        }
    }

    /// The kernel's thread: drop the pages' cached copies from every inode of the dataset
    /// (a dirty one is written back first, by a FUSE thread), wait until the kernel did
    /// (at most `KERNEL_WAIT`), carry out what waited for it, and tell the machine once the
    /// pages are gone. Its own thread: the pool may be needed to serve that write. A page a
    /// kernel request is under way for (a READ bringing it in, a WRITE of it) is dropped
    /// when that request ends, and not waited for: the kernel's drop would wait for the
    /// request, which may wait for what waits here (its owner parks a fetch behind the
    /// commit this node's answer holds up); the machine makes such a read bring bytes no
    /// older than a copy prepared here, and stages such a write on the owner's bytes.
    fn invalidate(self: &Arc<Self>, queue: &Receiver<Invalidation>) {
        for job in queue {
            let Invalidation {
                dataset,
                pages,
                mark,
                then,
            } = job;
            let dropped = Input::Invalidated {
                dataset,
                pages: pages.clone(),
                mark,
            };
            let Some((invalidator, inodes)) = self.kernel_inodes(dataset) else {
                self.feed(dropped);
                self.carry_all(then);
                continue;
            };
            // A page with a request under way is dropped when the request ends (`run`):
            // asked now, the drop would hold up every later one behind that request.
            let waited: Vec<u64> = {
                let mut in_flight = self.in_flight.lock().expect("in flight lock");
                pages
                    .iter()
                    .copied()
                    .filter(|page| match in_flight.get_mut(&(dataset, *page)) {
                        Some((_, drop)) => {
                            *drop = true;
                            false
                        }
                        None => true,
                    })
                    .collect()
            };
            ask_to_drop(&invalidator, &inodes, &waited);
            let done = waited.is_empty() || invalidator.flush_within(KERNEL_WAIT);
            if done {
                self.feed(dropped);
                self.carry_all(then);
                continue;
            }
            tracing::debug!(
                dataset,
                "the kernel is slow to drop pages (a request of them under way): what waited goes on"
            );
            self.carry_all(then);
            let runtime = self.clone();
            std::thread::spawn(move || {
                invalidator.flush();
                runtime.feed(dropped);
            });
        }
    }

    /// The invalidation handle and the inodes showing `dataset`, if the kernel may cache
    /// any of its pages.
    fn kernel_inodes(&self, dataset: DatasetId) -> Option<(Invalidator, BTreeSet<Ino>)> {
        let kernel = self.kernel.lock().expect("kernel lock");
        let inodes = kernel
            .inodes
            .get(&dataset)
            .filter(|inodes| !inodes.is_empty())?;
        Some((kernel.invalidator.clone()?, inodes.clone()))
    }

    /// The kernel connection exists: pages can be invalidated from now on.
    pub fn attach_invalidator(&self, invalidator: Invalidator) {
        self.kernel.lock().expect("kernel lock").invalidator = Some(invalidator);
    }

    /// The kernel may cache pages of `dataset` under inode `ino` from now on.
    pub fn note_inode(&self, ino: Ino, dataset: DatasetId) {
        self.kernel
            .lock()
            .expect("kernel lock")
            .inodes
            .entry(dataset)
            .or_default()
            .insert(ino);
    }

    /// A program's operation, numbered here: its end.
    pub fn run(&self, op: impl FnOnce(OpId) -> Op) -> OpResult {
        let started = self.start_op(op);
        self.end_of(started)
    }

    /// Operations that do not depend on each other, all under way at once (a view's pages
    /// from their owners): their ends, in order.
    pub fn run_all<F: FnOnce(OpId) -> Op>(
        &self,
        ops: impl IntoIterator<Item = F>,
    ) -> Vec<OpResult> {
        let started: Vec<Started> = ops.into_iter().map(|op| self.start_op(op)).collect();
        started
            .into_iter()
            .map(|started| self.end_of(started))
            .collect()
    }

    fn start_op(&self, op: impl FnOnce(OpId) -> Op) -> Started {
        let id = self.next_op.fetch_add(1, Ordering::Relaxed);
        let op = op(id);
        let waits = matches!(op, Op::Commit { .. });
        let moving: Vec<(DatasetId, u64)> = match &op {
            Op::Read { dataset, page, .. } => vec![(*dataset, *page)],
            Op::Write {
                dataset, stores, ..
            } => stores
                .iter()
                .map(|(page, _, _)| (*dataset, *page))
                .collect(),
            Op::WriteBack { dataset, pages, .. } => {
                pages.iter().map(|(page, _)| (*dataset, *page)).collect()
            }
            _ => Vec::new(),
        };
        let (done, wait) = bounded(1);
        self.ops.lock().expect("ops lock").insert(id, (done, waits));
        {
            let mut in_flight = self.in_flight.lock().expect("in flight lock");
            for page in &moving {
                in_flight.entry(*page).or_default().0 += 1;
            }
        }
        self.feed(Input::Start(op));
        Started { id, wait, moving }
    }

    /// Wait for a started operation's end; the kernel drops what waited for it.
    fn end_of(&self, started: Started) -> OpResult {
        let Started { id, wait, moving } = started;
        let result = wait.recv_timeout(OP_WAIT);
        let mut to_drop = Vec::new();
        {
            let mut in_flight = self.in_flight.lock().expect("in flight lock");
            for page in &moving {
                if let Some((count, drop)) = in_flight.get_mut(page) {
                    *count -= 1;
                    if *count == 0 {
                        if *drop {
                            to_drop.push(*page);
                        }
                        in_flight.remove(page);
                    }
                }
            }
        }
        for (dataset, page) in to_drop {
            if let Some((invalidator, inodes)) = self.kernel_inodes(dataset) {
                ask_to_drop(&invalidator, &inodes, &[page]);
            }
        }
        match result {
            Ok(result) => result,
            Err(_) => {
                self.ops.lock().expect("ops lock").remove(&id);
                OpResult::InDoubt(format!(
                    "the node machine did not end the operation within {} s",
                    OP_WAIT.as_secs()
                ))
            }
        }
    }

    /// A request from the RPC server: a peer's (wrapped with its sender and call number)
    /// or a tool's. Its reply, or busy if the machine gave none within the longest a
    /// request can wait in it.
    pub fn serve(&self, request: NodeRequest) -> NodeReply {
        let (from, call, request) = match request {
            NodeRequest::Call {
                from,
                call,
                request,
            } => (from, call, *request),
            request => {
                let call = TOOL_CALLS | self.next_tool_call.fetch_add(1, Ordering::Relaxed);
                (hotpot_core::proto::node::DISPATCHER, call, request)
            }
        };
        let (reply, wait) = bounded(1);
        self.replies
            .lock()
            .expect("replies lock")
            .insert((from, call), reply);
        self.feed(Input::Request {
            from,
            call,
            request,
        });
        let longest = Duration::from_millis(
            self.timing
                .dispatcher_wait_ms
                .max(self.timing.ready_wait_ms)
                + self.timing.call_timeout_ms,
        );
        match wait.recv_timeout(longest) {
            Ok(reply) => reply,
            Err(_) => {
                self.replies
                    .lock()
                    .expect("replies lock")
                    .remove(&(from, call));
                NodeReply::Failed(FsError::Busy(format!(
                    "node {} gave no answer within {} s",
                    self.id,
                    longest.as_secs()
                )))
            }
        }
    }

    /// The peers' addresses and the dispatcher's promotions, as the heartbeat last heard.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }
}

/// Queue the kernel's drop of `pages` of every one of `inodes`.
fn ask_to_drop(invalidator: &Invalidator, inodes: &BTreeSet<Ino>, pages: &[u64]) {
    let page_bytes = hotpot_core::pm::PAGE_BYTES as u64;
    for ino in inodes {
        for page in pages {
            invalidator.invalidate(*ino, page * page_bytes, page_bytes);
        }
    }
}
