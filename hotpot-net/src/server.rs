//! The RPC server, the same over every transport. Every connection arrives over TCP and
//! proves the cluster secret; it then either carries frames itself (TCP) or, when its first
//! frame asks for it and the server has an RDMA device, moves its frames to a verbs queue
//! pair and keeps the TCP connection only to notice the peer leaving. Requests are decoded
//! on the connection's thread (an undecodable one closes only that connection) and run on a
//! bounded pool of worker threads.

use std::net::TcpListener;
use std::sync::Arc;

use crossbeam_channel::{bounded, Sender};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auth::Secret;
use crate::frame;

type Job = Box<dyn FnOnce() + Send>;
/// Runs the handler on a decoded request and encodes the reply frame for request `id`.
type Call = Box<dyn FnOnce(u64) -> Option<Vec<u8>> + Send>;
type Decode = dyn Fn(&[u8]) -> Result<Call, String> + Send + Sync;
/// Sends one reply frame back on the connection the request came from.
pub(crate) type Reply = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What every connection of one server shares.
pub(crate) struct Service {
    pub(crate) secret: Secret,
    decode: Box<Decode>,
    jobs: Sender<Job>,
    #[cfg(feature = "verbs")]
    pub(crate) verbs: Option<Arc<crate::verbs::Device>>,
}

impl Service {
    /// Decode one request now and queue its handler; `Err` closes the connection.
    pub(crate) fn submit(&self, id: u64, body: &[u8], reply: Reply) -> Result<(), String> {
        let call = (self.decode)(body)?;
        let job: Job = Box::new(move || {
            if let Some(frame) = call(id) {
                reply(&frame);
            }
        });
        self.jobs
            .send(job)
            .map_err(|_| "the worker pool stopped".to_string())
    }
}

/// A running server; dropping it does not stop it (it lives as long as the process).
pub struct Server {
    local_addr: std::net::SocketAddr,
}

/// How a server is set up beyond its handler.
pub struct ServerConfig {
    pub secret: Secret,
    pub workers: usize,
    /// Serve verbs connections on this device (peers asking for verbs are refused without).
    #[cfg(feature = "verbs")]
    pub verbs: Option<Arc<crate::verbs::Device>>,
}

impl ServerConfig {
    pub fn tcp(secret: Secret, workers: usize) -> ServerConfig {
        ServerConfig {
            secret,
            workers,
            #[cfg(feature = "verbs")]
            verbs: None,
        }
    }
}

impl Server {
    /// Serve `listener` over TCP with `handler` on `workers` threads; every connection must
    /// first prove `secret`.
    pub fn spawn<Req, Resp, H>(
        listener: TcpListener,
        secret: Secret,
        workers: usize,
        handler: H,
    ) -> std::io::Result<Server>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + 'static,
        H: Fn(Req) -> Resp + Send + Sync + 'static,
    {
        Server::spawn_with(listener, ServerConfig::tcp(secret, workers), handler)
    }

    pub fn spawn_with<Req, Resp, H>(
        listener: TcpListener,
        config: ServerConfig,
        handler: H,
    ) -> std::io::Result<Server>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + 'static,
        H: Fn(Req) -> Resp + Send + Sync + 'static,
    {
        assert!(config.workers > 0);
        let local_addr = listener.local_addr()?;
        let handler = Arc::new(handler);
        let (jobs, job_queue) = bounded::<Job>(config.workers * 64);
        for index in 0..config.workers {
            let job_queue = job_queue.clone();
            std::thread::Builder::new()
                .name(format!("rpc-worker-{index}"))
                .spawn(move || {
                    for job in job_queue {
                        job();
                    }
                })?;
        }
        let decode: Box<Decode> = Box::new(move |body: &[u8]| {
            let request: Req = postcard::from_bytes(body).map_err(|error| error.to_string())?;
            let handler = handler.clone();
            let call: Call = Box::new(move |id| {
                let reply = handler(request);
                match frame::encode(id, &reply) {
                    Ok(frame) => Some(frame),
                    Err(error) => {
                        tracing::error!(%error, "cannot encode a reply");
                        None
                    }
                }
            });
            Ok(call)
        });
        let service = Arc::new(Service {
            secret: config.secret,
            decode,
            jobs,
            #[cfg(feature = "verbs")]
            verbs: config.verbs,
        });
        std::thread::Builder::new()
            .name(format!("rpc-accept {local_addr}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let service = service.clone();
                    let spawned = std::thread::Builder::new()
                        .name("rpc-conn".into())
                        .spawn(move || crate::tcp::serve_connection(stream, &service));
                    if let Err(error) = spawned {
                        tracing::warn!(%error, "cannot start a connection thread");
                    }
                }
            })?;
        Ok(Server { local_addr })
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }
}
