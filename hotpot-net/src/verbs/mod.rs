//! RDMA verbs transport (cargo feature `verbs`): the same `Transport` as TCP, so the protocol
//! code does not change. A connection starts as TCP (address, cluster secret), swaps queue
//! pair endpoints in its first frame (`upgrade.rs`), then carries every frame over an RC
//! queue pair as SEND/RECV (`queue.rs`); the TCP connection stays open only so either side
//! notices the other leaving at once (a vanished peer also fails sends by retry exhaustion).
//! Replies land in the caller's registered receive ring and complete the waiting call by
//! request id, as over TCP; errors are the same typed `NetError`s. A node may expose memory
//! (its PM frames) to one-sided RDMA READs over every connection (`Device::expose`).

mod device;
mod queue;

pub use device::Device;

use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::client::{Inbox, Link, Transport};
use crate::frame::{self, Reassembler};
use crate::server::{Reply, Service};
use crate::tcp::HANDSHAKE_TIMEOUT;
use crate::upgrade::{Endpoint, UpgradeReply};
use crate::{NetError, Secret};
use queue::{Queue, ReadError};

/// How long a one-sided read may take before the call fails with `Timeout`.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The verbs transport on one device.
pub struct Verbs {
    device: Arc<Device>,
}

impl Verbs {
    pub fn new(device: Arc<Device>) -> Verbs {
        Verbs { device }
    }
}

impl Transport for Verbs {
    fn name(&self) -> &'static str {
        "verbs"
    }

    fn connect(
        &self,
        addr: &str,
        secret: &Secret,
        inbox: Inbox,
    ) -> Result<Box<dyn Link>, NetError> {
        let refused = |reason: String| NetError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::other(reason),
        };
        let mut stream = crate::tcp::open(addr, secret)?;
        let queue = Arc::new(Queue::create(&self.device)?);
        let ask = frame::encode(frame::UPGRADE_ID, &queue.endpoint(self.device.exposed()))?;
        frame::write_frame(&mut stream, &ask).map_err(|error| refused(error.to_string()))?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|error| refused(error.to_string()))?;
        let answer = match frame::read_frame(&mut stream) {
            Ok(Some((frame::UPGRADE_ID, body))) => postcard::from_bytes::<UpgradeReply>(&body)
                .map_err(|error| refused(format!("undecodable verbs answer: {error}")))?,
            Ok(_) => return Err(refused("the peer did not answer the verbs request".into())),
            Err(error) => return Err(refused(format!("verbs request: {error}"))),
        };
        let remote = match answer {
            UpgradeReply::Accepted(remote) => remote,
            UpgradeReply::Refused(reason) => return Err(refused(reason)),
        };
        queue.connect(&remote)?;
        stream
            .set_read_timeout(None)
            .map_err(|error| refused(error.to_string()))?;
        let closer = stream
            .try_clone()
            .map_err(|error| refused(error.to_string()))?;
        let receiving = queue.clone();
        let delivering = inbox.clone();
        spawn(format!("verbs-reader {addr}"), move || {
            let mut frames = Reassembler::default();
            receiving.receive(|piece| match frames.push(piece) {
                Ok(complete) => {
                    for (id, body) in complete {
                        delivering.deliver(id, body);
                    }
                    true
                }
                Err(_) => false,
            });
            receiving.stop();
            delivering.close();
        })
        .map_err(|error| refused(error.to_string()))?;
        let watched = queue.clone();
        let closing = inbox.clone();
        spawn(format!("verbs-watch {addr}"), move || {
            wait_for_end(stream);
            watched.stop();
            closing.close();
        })
        .map_err(|error| refused(error.to_string()))?;
        Ok(Box::new(VerbsLink {
            addr: addr.to_string(),
            queue,
            closer,
            inbox,
        }))
    }
}

fn spawn(name: String, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new().name(name).spawn(body).map(drop)
}

/// Block until the peer closes the side channel (it never sends on it after the upgrade).
fn wait_for_end(mut stream: TcpStream) {
    let mut byte = [0u8; 64];
    while matches!(stream.read(&mut byte), Ok(n) if n > 0) {}
}

struct VerbsLink {
    addr: String,
    queue: Arc<Queue>,
    closer: TcpStream,
    inbox: Inbox,
}

impl Link for VerbsLink {
    fn send(&self, frame: &[u8]) -> Result<(), NetError> {
        if self.queue.send_frame(frame).is_err() {
            self.close();
            return Err(NetError::Disconnected {
                addr: self.addr.clone(),
            });
        }
        frame::count_sent(frame.len());
        Ok(())
    }

    fn close(&self) {
        let _ = self.closer.shutdown(Shutdown::Both);
        self.queue.stop();
        self.inbox.close();
    }

    fn remote_bytes(&self) -> u64 {
        self.queue.remote().map_or(0, |(_, bytes, _)| bytes)
    }

    fn remote_read(&self, offset: u64, into: &mut [u8]) -> Result<(), NetError> {
        match self.queue.remote_read(offset, into, READ_TIMEOUT) {
            Ok(()) => {
                frame::count_received(into.len());
                Ok(())
            }
            Err(ReadError::NotExposed) => Err(NetError::Unsupported {
                what: "one-sided reads of a peer that exposes no memory",
            }),
            Err(ReadError::OutOfRange) => Err(NetError::Decode {
                addr: self.addr.clone(),
                reason: format!(
                    "one-sided read of {} bytes at {offset} is outside the {} exposed bytes",
                    into.len(),
                    self.remote_bytes()
                ),
            }),
            Err(ReadError::Timeout) => {
                self.close();
                Err(NetError::Timeout {
                    addr: self.addr.clone(),
                    timeout: READ_TIMEOUT,
                })
            }
            Err(ReadError::Dead) => {
                self.close();
                Err(NetError::Disconnected {
                    addr: self.addr.clone(),
                })
            }
        }
    }
}

/// Server side of an upgraded connection: connect a queue pair to the client's, answer with
/// ours over TCP, serve frames from the queue until either side goes away.
pub(crate) fn serve(
    stream: TcpStream,
    request: &[u8],
    peer: &str,
    device: &Arc<Device>,
    service: &Arc<Service>,
    tcp_reply: &Reply,
) {
    let refuse = |reason: String| {
        tracing::warn!(%peer, %reason, "refused a verbs connection");
        if let Ok(frame) = frame::encode(frame::UPGRADE_ID, &UpgradeReply::Refused(reason)) {
            tcp_reply(&frame);
        }
    };
    let remote: Endpoint = match postcard::from_bytes(request) {
        Ok(remote) => remote,
        Err(error) => return refuse(format!("undecodable verbs request: {error}")),
    };
    let queue = match Queue::create(device).and_then(|queue| {
        queue.connect(&remote)?;
        Ok(Arc::new(queue))
    }) {
        Ok(queue) => queue,
        Err(error) => return refuse(error.to_string()),
    };
    match frame::encode(
        frame::UPGRADE_ID,
        &UpgradeReply::Accepted(queue.endpoint(device.exposed())),
    ) {
        Ok(frame) => tcp_reply(&frame),
        Err(error) => return refuse(error.to_string()),
    }
    let replying = queue.clone();
    let reply: Reply = Arc::new(move |frame: &[u8]| {
        if replying.send_frame(frame).is_ok() {
            frame::count_sent(frame.len());
        }
    });
    let receiving = queue.clone();
    let serving = service.clone();
    let closer = stream.try_clone();
    let from = peer.to_string();
    let receiver = std::thread::Builder::new()
        .name("verbs-conn".into())
        .spawn(move || {
            let mut frames = Reassembler::default();
            receiving.receive(|piece| match frames.push(piece) {
                Ok(complete) => complete.into_iter().all(|(id, body)| {
                    serving
                        .submit(id, &body, reply.clone())
                        .inspect_err(|error| {
                            tracing::warn!(peer = %from, %error, "closing verbs connection: undecodable request")
                        })
                        .is_ok()
                }),
                Err(error) => {
                    tracing::warn!(peer = %from, %error, "closing verbs connection");
                    false
                }
            });
            // The queue failed or was stopped: end the side channel too.
            if let Ok(closer) = closer {
                let _ = closer.shutdown(Shutdown::Both);
            }
        });
    wait_for_end(stream);
    queue.stop();
    if let Ok(receiver) = receiver {
        let _ = receiver.join();
    }
}
