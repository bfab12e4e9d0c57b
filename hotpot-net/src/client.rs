//! The RPC client, the same over every transport: request ids, the waiting callers, timeouts.
//! A transport only moves frames: its `Link` sends request frames and hands reply frames to
//! the `Inbox` it was given, which completes the caller waiting for that id, and closes the
//! inbox when the connection dies so every waiting call fails with `Disconnected` at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auth::Secret;
use crate::tcp::Tcp;
use crate::{frame, NetError};

/// How long a caller waits for its reply awake before it parks.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(60);

/// A way to reach peers. TCP is always there; verbs (feature `verbs`) is the other.
pub trait Transport: Send + Sync {
    /// Short name shown by `hotpot status` ("tcp", "verbs").
    fn name(&self) -> &'static str;
    /// Open a connection to `addr` that proved `secret`; replies go to `inbox`.
    fn connect(&self, addr: &str, secret: &Secret, inbox: Inbox)
        -> Result<Box<dyn Link>, NetError>;
}

/// One open connection of some transport.
pub trait Link: Send + Sync {
    /// Send one request frame (as `frame::encode` made it). An error means the connection
    /// is unusable; the inbox is closed by then.
    fn send(&self, frame: &[u8]) -> Result<(), NetError>;
    /// Close the connection (idempotent); the inbox closes.
    fn close(&self);
    /// Size of the memory the peer exposes to one-sided reads (0: none, or not this transport).
    fn remote_bytes(&self) -> u64 {
        0
    }
    /// Read `into.len()` bytes at `offset` of the peer's exposed memory, without the peer's
    /// CPU. Only links that report `remote_bytes() > 0` support it.
    fn remote_read(&self, _offset: u64, _into: &mut [u8]) -> Result<(), NetError> {
        Err(NetError::Unsupported {
            what: "one-sided reads",
        })
    }
}

/// Where a link delivers reply frames, shared with the client's waiting callers.
#[derive(Clone)]
pub struct Inbox(Arc<InboxState>);

struct InboxState {
    waiting: Mutex<HashMap<u64, Sender<Vec<u8>>>>,
    open: AtomicBool,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox(Arc::new(InboxState {
            waiting: Mutex::new(HashMap::new()),
            open: AtomicBool::new(true),
        }))
    }

    fn expect(&self, id: u64) -> Receiver<Vec<u8>> {
        let (sender, receiver) = bounded(1);
        self.0
            .waiting
            .lock()
            .expect("inbox lock")
            .insert(id, sender);
        // Closed meanwhile (its clear may have run before the insert): fail now, not at the
        // timeout.
        if !self.is_open() {
            self.forget(id);
        }
        receiver
    }

    fn forget(&self, id: u64) {
        self.0.waiting.lock().expect("inbox lock").remove(&id);
    }

    /// Complete the caller waiting for `id` (a late reply to a timed-out call is dropped).
    pub fn deliver(&self, id: u64, body: Vec<u8>) {
        let waiter = self.0.waiting.lock().expect("inbox lock").remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(body);
        }
    }

    /// The connection is gone: every waiting call fails with `Disconnected`.
    pub fn close(&self) {
        self.0.open.store(false, Ordering::Release);
        // Dropping the senders wakes every waiting caller.
        self.0.waiting.lock().expect("inbox lock").clear();
    }

    pub fn is_open(&self) -> bool {
        self.0.open.load(Ordering::Acquire)
    }
}

struct Connected {
    link: Box<dyn Link>,
    inbox: Inbox,
}

/// RPC client to one peer. Cheap to share (`Arc`); reconnects on the next call after a drop.
pub struct Client {
    addr: String,
    secret: Secret,
    transport: Arc<dyn Transport>,
    connection: Mutex<Option<Arc<Connected>>>,
    next_id: AtomicU64,
}

impl Client {
    /// A client over TCP.
    pub fn new(addr: impl Into<String>, secret: Secret) -> Client {
        Client::with_transport(addr, secret, Arc::new(Tcp))
    }

    pub fn with_transport(
        addr: impl Into<String>,
        secret: Secret,
        transport: Arc<dyn Transport>,
    ) -> Client {
        Client {
            addr: addr.into(),
            secret,
            transport,
            connection: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The transport's name ("tcp", "verbs").
    pub fn transport(&self) -> &'static str {
        self.transport.name()
    }

    fn connect(&self) -> Result<Arc<Connected>, NetError> {
        let mut slot = self.connection.lock().expect("client lock");
        if let Some(existing) = slot.as_ref() {
            if existing.inbox.is_open() {
                return Ok(existing.clone());
            }
        }
        let inbox = Inbox::new();
        let link = self
            .transport
            .connect(&self.addr, &self.secret, inbox.clone())?;
        let connected = Arc::new(Connected { link, inbox });
        *slot = Some(connected.clone());
        Ok(connected)
    }

    /// Send `request` and wait up to `timeout` for its reply.
    pub fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, NetError> {
        let connection = self.connect()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame::encode(id, request)?;
        let receiver = connection.inbox.expect(id);
        if let Err(error) = connection.link.send(&frame) {
            connection.inbox.forget(id);
            return Err(error);
        }
        // Replies on a local network come back within tens of microseconds: wait for them
        // awake for a bounded moment, because parking costs a cross-CPU wakeup of about the
        // same size (measured: RPC p50 101 µs parking at once on a 2-vCPU VM).
        let spin_until = Instant::now() + SPIN_BEFORE_PARK;
        let early = loop {
            match receiver.try_recv() {
                Ok(body) => break Some(body),
                Err(crossbeam_channel::TryRecvError::Disconnected) => break None,
                Err(crossbeam_channel::TryRecvError::Empty) if Instant::now() < spin_until => {
                    std::hint::spin_loop()
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break None,
            }
        };
        let waited = match early {
            Some(body) => Ok(body),
            None => receiver.recv_timeout(timeout),
        };
        match waited {
            Ok(body) => postcard::from_bytes(&body).map_err(|error| NetError::Decode {
                addr: self.addr.clone(),
                reason: error.to_string(),
            }),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                connection.inbox.forget(id);
                Err(NetError::Timeout {
                    addr: self.addr.clone(),
                    timeout,
                })
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(NetError::Disconnected {
                addr: self.addr.clone(),
            }),
        }
    }

    /// Whether a connection is open now (never connects).
    pub fn is_connected(&self) -> bool {
        self.connection
            .lock()
            .expect("client lock")
            .as_ref()
            .is_some_and(|connection| connection.inbox.is_open())
    }

    /// Bytes the peer exposes to one-sided reads over the current connection (0 if none:
    /// TCP, or a peer that exposes nothing). Connects if needed.
    pub fn remote_bytes(&self) -> u64 {
        self.connect()
            .map(|connection| connection.link.remote_bytes())
            .unwrap_or(0)
    }

    /// One-sided read of the peer's exposed memory (see `Link::remote_read`).
    pub fn remote_read(&self, offset: u64, into: &mut [u8]) -> Result<(), NetError> {
        self.connect()?.link.remote_read(offset, into)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.lock().expect("client lock").take() {
            connection.link.close();
        }
    }
}

/// Ask every client the same thing at once; replies in the clients' order.
pub fn multicall<Req, Resp>(
    clients: &[Arc<Client>],
    request: &Req,
    timeout: Duration,
) -> Vec<Result<Resp, NetError>>
where
    Req: Serialize + Sync,
    Resp: DeserializeOwned + Send,
{
    // One peer (the usual replica count): no thread to start.
    if let [client] = clients {
        return vec![client.call(request, timeout)];
    }
    std::thread::scope(|scope| {
        let calls: Vec<_> = clients
            .iter()
            .map(|client| scope.spawn(move || client.call(request, timeout)))
            .collect();
        calls
            .into_iter()
            .map(|call| call.join().expect("multicall thread panicked"))
            .collect()
    })
}
