//! Moving a TCP connection to verbs: the client's first frame (id `frame::UPGRADE_ID`)
//! carries its queue pair's `Endpoint`; the server answers with its own, or refuses with a
//! reason (no RDMA device, or a build without the `verbs` feature), so a mismatched cluster
//! fails with a message, never a hang. These messages exist in every build.

use std::net::TcpStream;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::server::{Reply, Service};

/// What one side of a queue pair tells the other to connect to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoint {
    pub qp_number: u32,
    pub packet_sequence: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// Memory the side exposes to one-sided reads: (address, bytes, rkey).
    pub exposed: Option<(u64, u64, u32)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum UpgradeReply {
    Accepted(Endpoint),
    Refused(String),
}

/// Server side of an upgrade request; returns when the connection ends.
pub(crate) fn serve(
    stream: TcpStream,
    request: &[u8],
    peer: &str,
    service: &Arc<Service>,
    reply: &Reply,
) {
    #[cfg(feature = "verbs")]
    if let Some(device) = &service.verbs {
        crate::verbs::serve(stream, request, peer, device, service, reply);
        return;
    }
    let _ = (stream, request, service);
    tracing::warn!(%peer, "refused a verbs connection: this node serves TCP only");
    if let Ok(frame) = crate::frame::encode(
        crate::frame::UPGRADE_ID,
        &UpgradeReply::Refused(
            "this node serves TCP only (start it with --transport verbs, in a build with the verbs feature)"
                .into(),
        ),
    ) {
        reply(&frame);
    }
}
