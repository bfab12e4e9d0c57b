//! hotpot transports. One interface for every transport: a `Client` makes RPC calls with a
//! request id and a timeout, `multicall` asks a set of peers at once, a `Server` hands each
//! request to a handler. A `Transport` only moves frames (length-prefixed postcard,
//! size-bounded; a frame that fails to decode closes only its own connection): TCP always,
//! RDMA verbs with the cargo feature `verbs` (see `verbs`).

pub mod auth;
mod client;
pub mod frame;
mod server;
pub mod tcp;
mod upgrade;
#[cfg(feature = "verbs")]
pub mod verbs;

pub use auth::Secret;
pub use client::{multicall, Client, Inbox, Link, Transport};
pub use frame::wire_bytes;
pub use server::{Server, ServerConfig};
pub use tcp::Tcp;

use std::time::Duration;

/// Largest frame either side accepts. A commit travels as one message per owner, so this
/// bounds what one msync may change per owner (about 65,000 pages); a larger one fails with
/// an error that says so. Frames are only read after the connection proved the secret.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Default RPC timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport errors: typed so callers can tell a dead peer from a slow one, the same for
/// every transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{addr} refused us: the cluster secret does not match")]
    WrongSecret { addr: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {addr} lost")]
    Disconnected { addr: String },
    #[error("no reply from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("frame of {bytes} bytes exceeds the bound of {MAX_FRAME_BYTES} bytes")]
    FrameTooLarge { bytes: usize },
    #[error("cannot decode a message from {addr}: {reason}")]
    Decode { addr: String, reason: String },
    #[error("cannot encode a message: {0}")]
    Encode(String),
    #[error("this transport does not support {what}")]
    Unsupported { what: &'static str },
    #[error("RDMA device: {0}")]
    Device(String),
}
