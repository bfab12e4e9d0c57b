//! One reliable-connected queue pair with its rings. Frames travel as a stream of SENDs of
//! at most one slot each (a page plus header): a sender holds the send side for a whole
//! frame, so its pieces arrive in order and contiguous (RC delivers in order) and the
//! receiver cuts frames out with the same length prefix TCP uses. Send slots are bounded
//! (at most `SEND_SLOTS` work requests in flight) and freed by their completions; receive
//! slots are reposted as soon as their bytes are copied out, and a receiver that falls
//! behind makes the sender wait (RNR retries without limit), never drops a message.
//! Completions of the receive side wake a thread through a completion channel after a
//! short busy poll; errors (a completion in error, a send that cannot get a slot for
//! `SEND_STALL`) mark the queue dead and the connection closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdma_sys::*;

use super::device::{Device, PORT};
use crate::upgrade::Endpoint;
use crate::NetError;

/// One receive or send slot: a page plus room for the frame header and message fields.
pub(crate) const SLOT_BYTES: usize = 4096 + 512;
const SEND_SLOTS: usize = 32;
const RECV_SLOTS: usize = 64;
/// Bounce buffer of one-sided reads (bigger reads go in pieces).
const READ_BYTES: usize = 64 << 10;
const READ_WR: u64 = u64::MAX;
/// A send that finds no free slot for this long means the peer stopped taking messages.
const SEND_STALL: Duration = Duration::from_secs(10);
/// How long the receive side polls busily after its last completion before it sleeps.
const BUSY_POLL: Duration = Duration::from_micros(50);
/// How often a sleeping receive side looks at its stop flag.
const WAKE_EVERY_MS: i32 = 100;

/// Registered memory owned by a queue.
struct Buffer {
    memory: Box<[u8]>,
    mr: *mut ibv_mr,
}

impl Buffer {
    fn new(device: &Device, bytes: usize) -> Result<Buffer, NetError> {
        let mut memory = vec![0u8; bytes].into_boxed_slice();
        // SAFETY: the memory lives as long as the Buffer, which deregisters it first.
        let mr = unsafe {
            ibv_reg_mr(
                device.pd,
                memory.as_mut_ptr().cast(),
                bytes,
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            )
        };
        if mr.is_null() {
            return Err(NetError::Device(format!(
                "cannot register {bytes} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Buffer { memory, mr })
    }

    fn sge(&mut self, offset: usize, length: usize) -> ibv_sge {
        ibv_sge {
            addr: self.memory[offset..].as_mut_ptr() as u64,
            length: length as u32,
            // SAFETY: registered in new.
            lkey: unsafe { (*self.mr).lkey },
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: registered in new; no work request uses it once its queue is destroyed.
        unsafe { ibv_dereg_mr(self.mr) };
    }
}

struct SendSide {
    slots: Buffer,
    free: Vec<u64>,
    read: Buffer,
    read_status: Option<ibv_wc_status::Type>,
}

struct RecvSide {
    slots: Buffer,
}

pub(crate) struct Queue {
    // Declared first: destroyed before the CQs, channel and buffers it uses.
    qp: *mut ibv_qp,
    send_cq: *mut ibv_cq,
    recv_cq: *mut ibv_cq,
    channel: *mut ibv_comp_channel,
    send: Mutex<SendSide>,
    recv: Mutex<RecvSide>,
    packet_sequence: u32,
    dead: AtomicBool,
    stop: AtomicBool,
    remote: OnceLock<Option<(u64, u64, u32)>>,
    device: Arc<Device>,
}

// SAFETY: libibverbs objects may be used from any thread; sends are serialized by `send`,
// receive slots by `recv`; everything is freed once in Drop.
unsafe impl Send for Queue {}
unsafe impl Sync for Queue {}

fn status_text(status: ibv_wc_status::Type) -> String {
    // SAFETY: ibv_wc_status_str returns a static string for any value.
    unsafe { std::ffi::CStr::from_ptr(ibv_wc_status_str(status)) }
        .to_string_lossy()
        .into_owned()
}

impl Queue {
    /// A queue pair in INIT with every receive slot posted.
    pub(crate) fn create(device: &Arc<Device>) -> Result<Queue, NetError> {
        let fail = |what: &str| {
            NetError::Device(format!(
                "cannot create {what} on {}: {}",
                device.name(),
                std::io::Error::last_os_error()
            ))
        };
        // Built field by field so a failure part way frees what exists (Drop skips nulls).
        let mut queue = Queue {
            qp: std::ptr::null_mut(),
            send_cq: std::ptr::null_mut(),
            recv_cq: std::ptr::null_mut(),
            channel: std::ptr::null_mut(),
            send: Mutex::new(SendSide {
                slots: Buffer::new(device, SEND_SLOTS * SLOT_BYTES)?,
                free: (0..SEND_SLOTS as u64).collect(),
                read: Buffer::new(device, READ_BYTES)?,
                read_status: None,
            }),
            recv: Mutex::new(RecvSide {
                slots: Buffer::new(device, RECV_SLOTS * SLOT_BYTES)?,
            }),
            packet_sequence: rand::random::<u32>() & 0xff_ffff,
            dead: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            remote: OnceLock::new(),
            device: device.clone(),
        };
        // SAFETY: plain constructors on an open context; results checked.
        unsafe {
            queue.channel = ibv_create_comp_channel(device.context);
            if queue.channel.is_null() {
                return Err(fail("a completion channel"));
            }
            let fd = (*queue.channel).fd;
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            queue.send_cq = ibv_create_cq(
                device.context,
                SEND_SLOTS as i32 + 2,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
            if queue.send_cq.is_null() {
                return Err(fail("a send completion queue"));
            }
            queue.recv_cq = ibv_create_cq(
                device.context,
                RECV_SLOTS as i32,
                std::ptr::null_mut(),
                queue.channel,
                0,
            );
            if queue.recv_cq.is_null() {
                return Err(fail("a receive completion queue"));
            }
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = queue.send_cq;
            init.recv_cq = queue.recv_cq;
            init.cap.max_send_wr = SEND_SLOTS as u32 + 1;
            init.cap.max_recv_wr = RECV_SLOTS as u32;
            init.cap.max_send_sge = 1;
            init.cap.max_recv_sge = 1;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            queue.qp = ibv_create_qp(device.pd, &mut init);
            if queue.qp.is_null() {
                return Err(fail("a queue pair"));
            }
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
            attr.pkey_index = 0;
            attr.port_num = PORT;
            attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
                | ibv_qp_attr_mask::IBV_QP_PORT.0
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
            if ibv_modify_qp(queue.qp, &mut attr, mask as i32) != 0 {
                return Err(fail("an INIT queue pair"));
            }
        }
        for slot in 0..RECV_SLOTS {
            queue.post_recv(&mut queue.recv.lock().expect("recv lock"), slot)?;
        }
        Ok(queue)
    }

    /// What the peer needs to connect to this queue; `exposed` is this side's memory.
    pub(crate) fn endpoint(&self, exposed: Option<(u64, u64, u32)>) -> Endpoint {
        Endpoint {
            // SAFETY: created in `create`.
            qp_number: unsafe { (*self.qp).qp_num },
            packet_sequence: self.packet_sequence,
            lid: self.device.lid,
            gid: self.device.gid,
            exposed,
        }
    }

    /// Connect to the peer's queue: INIT → RTR → RTS.
    pub(crate) fn connect(&self, remote: &Endpoint) -> Result<(), NetError> {
        let _ = self.remote.set(remote.exposed);
        let fail = |state: &str| {
            NetError::Device(format!(
                "cannot move the queue pair to {state}: {}",
                std::io::Error::last_os_error()
            ))
        };
        // SAFETY: zeroed attributes are valid; the QP exists.
        unsafe {
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
            attr.path_mtu = self.device.mtu;
            attr.dest_qp_num = remote.qp_number;
            attr.rq_psn = remote.packet_sequence;
            attr.max_dest_rd_atomic = 4;
            attr.min_rnr_timer = 12;
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = remote.gid;
            attr.ah_attr.grh.sgid_index = self.device.gid_index;
            attr.ah_attr.grh.hop_limit = 64;
            attr.ah_attr.dlid = remote.lid;
            attr.ah_attr.port_num = PORT;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
                | ibv_qp_attr_mask::IBV_QP_AV.0
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0;
            if ibv_modify_qp(self.qp, &mut attr, mask as i32) != 0 {
                return Err(fail("RTR"));
            }
            let mut attr: ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
            // 4.096 µs × 2^14 ≈ 67 ms per try, 7 tries: a vanished peer fails sends in ≈ 0.5 s.
            attr.timeout = 14;
            attr.retry_cnt = 7;
            // 7: retry without limit while the receiver has no slot posted (flow control).
            attr.rnr_retry = 7;
            attr.sq_psn = self.packet_sequence;
            attr.max_rd_atomic = 4;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0;
            if ibv_modify_qp(self.qp, &mut attr, mask as i32) != 0 {
                return Err(fail("RTS"));
            }
        }
        Ok(())
    }

    /// The peer's exposed memory: (address, bytes, rkey).
    pub(crate) fn remote(&self) -> Option<(u64, u64, u32)> {
        self.remote.get().copied().flatten()
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    fn die(&self, why: &str) {
        if !self.dead.swap(true, Ordering::AcqRel) && !self.stop.load(Ordering::Acquire) {
            tracing::warn!(why, "verbs queue pair failed; closing the connection");
        }
    }

    /// Ask the receive side to return (within `WAKE_EVERY_MS`) and sends to fail.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.dead.store(true, Ordering::Release);
    }

    fn post_recv(&self, side: &mut RecvSide, slot: usize) -> Result<(), NetError> {
        let mut sge = side.slots.sge(slot * SLOT_BYTES, SLOT_BYTES);
        // SAFETY: zeroed is a valid ibv_recv_wr; the sge names registered memory that this
        // queue owns and does not touch until the completion.
        let mut wr: ibv_recv_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = slot as u64;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP exists; wr and sge live across the call.
        if unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) } != 0 {
            self.die("cannot post a receive");
            return Err(NetError::Device("cannot post a receive".into()));
        }
        Ok(())
    }

    /// Take send completions: free their slots, record a read's status.
    fn reap(&self, side: &mut SendSide) {
        // SAFETY: zeroed is a valid ibv_wc.
        let mut completions: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        // SAFETY: the CQ exists; the array has room for 16.
        let count = unsafe { ibv_poll_cq(self.send_cq, 16, completions.as_mut_ptr()) };
        if count < 0 {
            self.die("polling the send completion queue failed");
            return;
        }
        for completion in &completions[..count as usize] {
            if completion.wr_id == READ_WR {
                side.read_status = Some(completion.status);
            } else {
                side.free.push(completion.wr_id);
            }
            if completion.status != ibv_wc_status::IBV_WC_SUCCESS {
                self.die(&status_text(completion.status));
            }
        }
    }

    /// Wait until `done` holds after reaping, up to `limit`; false on death or time out.
    fn reap_until(
        &self,
        side: &mut SendSide,
        limit: Duration,
        done: impl Fn(&SendSide) -> bool,
    ) -> bool {
        let started = Instant::now();
        let mut rounds = 0u32;
        loop {
            self.reap(side);
            if done(side) {
                return true;
            }
            if self.is_dead() || started.elapsed() > limit {
                return false;
            }
            rounds += 1;
            if rounds > 200 {
                std::thread::sleep(Duration::from_micros(20));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Send one frame as consecutive SENDs.
    pub(crate) fn send_frame(&self, frame: &[u8]) -> Result<(), ()> {
        let mut side = self.send.lock().expect("send lock");
        for piece in frame.chunks(SLOT_BYTES) {
            if self.is_dead()
                || !self.reap_until(&mut side, SEND_STALL, |side| !side.free.is_empty())
            {
                self.die("no send slot came free: the peer stopped taking messages");
                return Err(());
            }
            let slot = side.free.pop().expect("a free slot");
            let offset = slot as usize * SLOT_BYTES;
            side.slots.memory[offset..offset + piece.len()].copy_from_slice(piece);
            let mut sge = side.slots.sge(offset, piece.len());
            // SAFETY: zeroed is a valid ibv_send_wr.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = slot;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            let mut bad = std::ptr::null_mut();
            // SAFETY: the slot is ours until its completion; wr and sge live across the call.
            if unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) } != 0 {
                self.die("cannot post a send");
                return Err(());
            }
        }
        Ok(())
    }

    /// One-sided read of the peer's exposed memory at `offset`.
    pub(crate) fn remote_read(
        &self,
        offset: u64,
        into: &mut [u8],
        limit: Duration,
    ) -> Result<(), ReadError> {
        let (base, bytes, rkey) = self.remote().ok_or(ReadError::NotExposed)?;
        if offset
            .checked_add(into.len() as u64)
            .is_none_or(|end| end > bytes)
        {
            return Err(ReadError::OutOfRange);
        }
        let mut side = self.send.lock().expect("send lock");
        let mut done = 0;
        while done < into.len() {
            let length = (into.len() - done).min(READ_BYTES);
            if self.is_dead() {
                return Err(ReadError::Dead);
            }
            let mut sge = side.read.sge(0, length);
            // SAFETY: zeroed is a valid ibv_send_wr.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = READ_WR;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_READ;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.wr.rdma = rdma_t {
                remote_addr: base + offset + done as u64,
                rkey,
            };
            side.read_status = None;
            let mut bad = std::ptr::null_mut();
            // SAFETY: the read buffer is ours until the completion; wr and sge live across.
            if unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) } != 0 {
                self.die("cannot post a read");
                return Err(ReadError::Dead);
            }
            if !self.reap_until(&mut side, limit, |side| side.read_status.is_some()) {
                // A read still in flight owns the buffer: the queue cannot be reused.
                self.die("a one-sided read did not complete");
                return Err(if self.is_dead() {
                    ReadError::Dead
                } else {
                    ReadError::Timeout
                });
            }
            if side.read_status != Some(ibv_wc_status::IBV_WC_SUCCESS) {
                return Err(ReadError::Dead);
            }
            into[done..done + length].copy_from_slice(&side.read.memory[..length]);
            done += length;
        }
        Ok(())
    }

    /// Hand every received piece to `take` until the queue stops or dies (or `take` says
    /// false). Runs on the connection's receive thread.
    pub(crate) fn receive(&self, mut take: impl FnMut(&[u8]) -> bool) {
        // SAFETY: zeroed is a valid ibv_wc.
        let mut completions: [ibv_wc; 16] = unsafe { std::mem::zeroed() };
        let mut last = Instant::now();
        let mut armed = false;
        loop {
            // SAFETY: the CQ exists; the array has room for 16.
            let count = unsafe { ibv_poll_cq(self.recv_cq, 16, completions.as_mut_ptr()) };
            if count < 0 {
                self.die("polling the receive completion queue failed");
                return;
            }
            for completion in &completions[..count as usize] {
                if completion.status != ibv_wc_status::IBV_WC_SUCCESS {
                    self.die(&status_text(completion.status));
                    return;
                }
                let slot = completion.wr_id as usize;
                let mut side = self.recv.lock().expect("recv lock");
                let offset = slot * SLOT_BYTES;
                let piece = &side.slots.memory[offset..offset + completion.byte_len as usize];
                if !take(piece) {
                    self.die("the peer sent a malformed frame");
                    return;
                }
                if self.post_recv(&mut side, slot).is_err() {
                    return;
                }
            }
            if count > 0 {
                last = Instant::now();
                armed = false;
                continue;
            }
            if self.stop.load(Ordering::Acquire) || self.is_dead() {
                return;
            }
            if last.elapsed() < BUSY_POLL {
                std::hint::spin_loop();
                continue;
            }
            if !armed {
                // Arm, then poll once more: a completion that raced the arming is seen now.
                // SAFETY: the CQ has a completion channel.
                unsafe { ibv_req_notify_cq(self.recv_cq, 0) };
                armed = true;
                continue;
            }
            self.sleep_until_completion();
            armed = false;
        }
    }

    fn sleep_until_completion(&self) {
        // SAFETY: the channel exists; its fd is non-blocking.
        unsafe {
            let mut poll = libc::pollfd {
                fd: (*self.channel).fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut poll, 1, WAKE_EVERY_MS) > 0 {
                let mut cq = std::ptr::null_mut();
                let mut context = std::ptr::null_mut();
                if ibv_get_cq_event(self.channel, &mut cq, &mut context) == 0 {
                    ibv_ack_cq_events(cq, 1);
                }
            }
        }
    }
}

/// Why a one-sided read failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    NotExposed,
    OutOfRange,
    Dead,
    Timeout,
}

impl Drop for Queue {
    fn drop(&mut self) {
        // SAFETY: no thread uses the queue any more (it is dropped with its last Arc); the
        // QP goes first, then what it used. Every event was acknowledged when taken.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            if !self.send_cq.is_null() {
                ibv_destroy_cq(self.send_cq);
            }
            if !self.recv_cq.is_null() {
                ibv_destroy_cq(self.recv_cq);
            }
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
        }
    }
}
