//! hotpot-core: the engine of hotpot, a distributed shared persistent memory. No sockets,
//! no FUSE, no threads of its own: the node runtime drives it.

pub mod page;
pub mod pm;
pub mod proto;
