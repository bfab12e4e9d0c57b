//! TCP transport: one connection per peer, many requests in flight on it. A reader thread
//! hands reply frames to the client's inbox and closes it when the connection drops. The
//! server side of every connection starts here too (see `server.rs`).

use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{self, AuthError, Secret};
use crate::client::{Inbox, Link, Transport};
use crate::frame::{self, FrameError};
use crate::server::Service;
use crate::NetError;

/// How long a handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The TCP transport.
pub struct Tcp;

impl Transport for Tcp {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn connect(
        &self,
        addr: &str,
        secret: &Secret,
        inbox: Inbox,
    ) -> Result<Box<dyn Link>, NetError> {
        let stream = open(addr, secret)?;
        let connect_error = |source| NetError::Connect {
            addr: addr.to_string(),
            source,
        };
        let reader = stream.try_clone().map_err(connect_error)?;
        let closer = stream.try_clone().map_err(connect_error)?;
        let delivering = inbox.clone();
        let peer = addr.to_string();
        std::thread::Builder::new()
            .name(format!("rpc-reader {addr}"))
            .spawn(move || {
                let mut reader = BufReader::new(reader);
                loop {
                    match frame::read_frame(&mut reader) {
                        Ok(Some((id, body))) => {
                            frame::count_received(body.len() + frame::HEADER_BYTES);
                            delivering.deliver(id, body);
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::debug!(addr = %peer, %error, "connection closed");
                            break;
                        }
                    }
                }
                delivering.close();
            })
            .map_err(connect_error)?;
        Ok(Box::new(TcpLink {
            addr: addr.to_string(),
            writer: Mutex::new(BufWriter::new(stream)),
            closer,
            inbox,
        }))
    }
}

/// Connect to `addr` and prove `secret`; the stream comes back with no read timeout.
pub(crate) fn open(addr: &str, secret: &Secret) -> Result<TcpStream, NetError> {
    let connect_error = |source| NetError::Connect {
        addr: addr.to_string(),
        source,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(connect_error)?
        .next()
        .ok_or_else(|| connect_error(std::io::Error::other("address resolves to nothing")))?;
    let mut stream =
        TcpStream::connect_timeout(&target, Duration::from_secs(3)).map_err(connect_error)?;
    stream.set_nodelay(true).map_err(connect_error)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(connect_error)?;
    match auth::client_handshake(&mut stream, secret) {
        Ok(()) => {}
        Err(AuthError::WrongSecret) => {
            tracing::error!(%addr, "peer refused the cluster secret");
            return Err(NetError::WrongSecret {
                addr: addr.to_string(),
            });
        }
        Err(AuthError::Io(source)) => return Err(connect_error(source)),
    }
    stream.set_read_timeout(None).map_err(connect_error)?;
    Ok(stream)
}

struct TcpLink {
    addr: String,
    writer: Mutex<BufWriter<TcpStream>>,
    closer: TcpStream,
    inbox: Inbox,
}

impl Link for TcpLink {
    fn send(&self, frame: &[u8]) -> Result<(), NetError> {
        let written = {
            let mut writer = self.writer.lock().expect("writer lock");
            frame::write_frame(&mut *writer, frame).and_then(|()| writer.flush())
        };
        if written.is_err() {
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
        self.inbox.close();
    }
}

/// Server side of one connection: prove the secret, then serve its frames, or move them to
/// verbs when the first frame asks for it.
pub(crate) fn serve_connection(mut stream: TcpStream, service: &Arc<Service>) {
    let peer = stream
        .peer_addr()
        .map(|addr| addr.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    match auth::server_handshake(&mut stream, &service.secret) {
        Ok(()) => {}
        Err(AuthError::WrongSecret) => {
            tracing::error!(%peer, "refused a connection: the peer does not know the cluster secret");
            return;
        }
        Err(AuthError::Io(error)) => {
            tracing::warn!(%peer, %error, "handshake failed; connection closed");
            return;
        }
    }
    let _ = stream.set_read_timeout(None);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let writer = Arc::new(Mutex::new(BufWriter::new(write_half)));
    let reply: crate::server::Reply = Arc::new(move |frame: &[u8]| {
        frame::count_sent(frame.len());
        let mut writer = writer.lock().expect("writer lock");
        let _ = frame::write_frame(&mut *writer, frame).and_then(|()| writer.flush());
    });
    let mut reader = BufReader::new(stream);
    let mut first = true;
    loop {
        let (id, body) = match frame::read_frame(&mut reader) {
            Ok(Some(frame)) => {
                frame::count_received(frame.1.len() + frame::HEADER_BYTES);
                frame
            }
            Ok(None) => return,
            Err(FrameError::Io(_)) => return,
            Err(error) => {
                tracing::warn!(%peer, %error, "closing connection");
                return;
            }
        };
        if std::mem::take(&mut first) && id == frame::UPGRADE_ID {
            crate::upgrade::serve(reader.into_inner(), &body, &peer, service, &reply);
            return;
        }
        if let Err(error) = service.submit(id, &body, reply.clone()) {
            tracing::warn!(%peer, %error, "closing connection: undecodable request");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::wire_bytes;
    use crate::{Client, Server};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn concurrent_calls_get_their_own_replies() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::spawn(listener, secret(), 4, |value: u64| value * 2).unwrap();
        let client = Arc::new(Client::new(server.local_addr().to_string(), secret()));
        std::thread::scope(|scope| {
            for thread in 0..8u64 {
                let client = client.clone();
                scope.spawn(move || {
                    for index in 0..200u64 {
                        let value = thread * 1000 + index;
                        let reply: u64 = client.call(&value, Duration::from_secs(5)).unwrap();
                        assert_eq!(reply, value * 2);
                    }
                });
            }
        });
        let (sent, received) = wire_bytes();
        assert!(
            sent >= 1600 * 12 && received >= 1600 * 12,
            "every frame is counted"
        );
    }

    #[test]
    fn undecodable_frame_closes_only_that_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server =
            Server::spawn(listener, secret(), 2, |value: String| value.len() as u64).unwrap();
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        auth::client_handshake(&mut raw, &secret()).unwrap();
        // Length 10: id + two bytes that are not a valid postcard string (length 200, no data).
        raw.write_all(&10u32.to_le_bytes()).unwrap();
        raw.write_all(&1u64.to_le_bytes()).unwrap();
        raw.write_all(&[200, 1]).unwrap();
        let mut buffer = [0u8; 1];
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            std::io::Read::read(&mut raw, &mut buffer).unwrap(),
            0,
            "server closed it"
        );
        let client = Client::new(server.local_addr().to_string(), secret());
        let reply: u64 = client
            .call(&"abc".to_string(), Duration::from_secs(5))
            .unwrap();
        assert_eq!(reply, 3);
    }

    #[test]
    fn dead_peer_fails_calls_with_a_typed_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = Client::new(addr.to_string(), secret());
        let result: Result<u64, _> = client.call(&1u64, Duration::from_millis(500));
        assert!(
            matches!(result, Err(NetError::Connect { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn an_oversized_frame_closes_only_that_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::spawn(listener, secret(), 2, |value: u64| value + 1).unwrap();
        let steady = Client::new(server.local_addr().to_string(), secret());
        assert_eq!(
            steady
                .call::<_, u64>(&1u64, Duration::from_secs(5))
                .unwrap(),
            2
        );
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        auth::client_handshake(&mut raw, &secret()).unwrap();
        raw.write_all(&(crate::MAX_FRAME_BYTES as u32).to_le_bytes())
            .unwrap();
        raw.write_all(&[0u8; 64]).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut raw, &mut byte).unwrap_or(0),
            0,
            "closed"
        );
        assert_eq!(
            steady
                .call::<_, u64>(&41u64, Duration::from_secs(5))
                .unwrap(),
            42
        );
    }

    fn secret() -> Secret {
        Secret::from_bytes(b"0123456789abcdef-test")
    }

    #[test]
    fn a_wrong_secret_is_refused_before_any_message_and_the_server_keeps_serving() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let server = Server::spawn(listener, secret(), 2, move |value: u64| {
            counted.fetch_add(1, Ordering::Relaxed);
            value
        })
        .unwrap();
        for wrong in [
            Secret::none(),
            Secret::from_bytes(b"0123456789abcdef-other"),
        ] {
            let client = Client::new(server.local_addr().to_string(), wrong);
            let result: Result<u64, _> = client.call(&7u64, Duration::from_secs(5));
            assert!(
                matches!(result, Err(NetError::WrongSecret { .. })),
                "{result:?}"
            );
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            0,
            "no request reached the handler"
        );
        let client = Client::new(server.local_addr().to_string(), secret());
        let reply: u64 = client.call(&7u64, Duration::from_secs(5)).unwrap();
        assert_eq!(reply, 7);
    }

    #[test]
    fn a_peer_that_says_nothing_is_dropped_after_the_handshake_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = Server::spawn(listener, secret(), 1, |value: u64| value).unwrap();
        let mut silent = TcpStream::connect(server.local_addr()).unwrap();
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut nonce = [0u8; 32];
        std::io::Read::read_exact(&mut silent, &mut nonce).unwrap();
        let started = std::time::Instant::now();
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut silent, &mut byte).unwrap_or(0), 0);
        assert!(started.elapsed() < Duration::from_secs(8));
    }
}
