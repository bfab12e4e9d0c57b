//! hotpot transports. One interface for every transport: a `Client` makes RPC calls with a
//! request id and a timeout, `multicall` asks a set of peers at once, a server hands each
//! request to a handler. TCP is the default transport; frames are length-prefixed postcard,
//! size-bounded, and a frame that fails to decode closes only its own connection.

pub mod auth;
pub mod frame;
pub mod tcp;

pub use auth::Secret;
pub use tcp::{multicall, wire_bytes, Client, Server};

use std::time::Duration;

/// Largest frame either side accepts. A commit travels as one message per owner, so this
/// bounds what one msync may change per owner (about 65,000 pages); a larger one fails with
/// an error that says so. Frames are only read after the connection proved the secret.
pub const MAX_FRAME_BYTES: usize = 256 << 20;
/// Default RPC timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport errors: typed so callers can tell a dead peer from a slow one.
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
}
