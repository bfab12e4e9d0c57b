//! The other nodes of the cluster as this node knows them: address, liveness (from the
//! dispatcher's heartbeat replies) and one RPC client each. A node that joined after the last
//! heartbeat is looked up at the dispatcher when first needed.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::{NodeId, NodeInfo, PeerLink};
use hotpot_net::{Client, Secret, Transport};

struct Peer {
    addr: String,
    live: bool,
    client: Arc<Client>,
}

pub struct Peers {
    secret: Secret,
    transport: Arc<dyn Transport>,
    dispatcher: Arc<Client>,
    map: RwLock<BTreeMap<NodeId, Peer>>,
    /// Owner promotions, as the dispatcher last said: node → the node owning its chunks.
    successors: RwLock<BTreeMap<NodeId, NodeId>>,
}

impl Peers {
    pub fn new(secret: Secret, dispatcher: Arc<Client>, transport: Arc<dyn Transport>) -> Peers {
        Peers {
            secret,
            transport,
            dispatcher,
            map: RwLock::new(BTreeMap::new()),
            successors: RwLock::new(BTreeMap::new()),
        }
    }

    /// Ask the dispatcher for the current node list now (not waiting for a heartbeat).
    fn refresh(&self) {
        match self
            .dispatcher
            .call::<_, DispatcherReply>(&DispatcherRequest::Status, hotpot_net::DEFAULT_TIMEOUT)
        {
            Ok(DispatcherReply::Status {
                nodes, successors, ..
            }) => self.update(&nodes, successors),
            Ok(other) => tracing::warn!(?other, "unexpected reply to a peer refresh"),
            Err(error) => tracing::warn!(%error, "cannot refresh the peer list"),
        }
    }

    /// Take the dispatcher's view; a peer whose address changed (a restart) gets a new client.
    pub fn update(&self, nodes: &[NodeInfo], successors: BTreeMap<NodeId, NodeId>) {
        *self.successors.write().expect("successors lock") = successors;
        let mut map = self.map.write().expect("peers lock");
        for node in nodes {
            match map.get_mut(&node.id) {
                Some(peer) if peer.addr == node.addr => peer.live = node.live,
                _ => {
                    map.insert(
                        node.id,
                        Peer {
                            addr: node.addr.clone(),
                            live: node.live,
                            client: Arc::new(Client::with_transport(
                                node.addr.clone(),
                                self.secret.clone(),
                                self.transport.clone(),
                            )),
                        },
                    );
                }
            }
        }
    }

    /// `id` just talked to this node (a fetch, a registration): it is live, whatever the
    /// last heartbeat reply said, so commits count it as a holder again at once.
    pub fn mark_live(&self, id: NodeId) {
        if let Some(peer) = self.map.write().expect("peers lock").get_mut(&id) {
            peer.live = true;
        }
    }

    /// The node that owns what `owner` was given (itself unless it was replaced).
    pub fn resolve(&self, owner: NodeId) -> NodeId {
        self.successors
            .read()
            .expect("successors lock")
            .get(&owner)
            .copied()
            .unwrap_or(owner)
    }

    pub fn successors(&self) -> BTreeMap<NodeId, NodeId> {
        self.successors.read().expect("successors lock").clone()
    }

    pub fn dispatcher(&self) -> &Client {
        &self.dispatcher
    }

    pub fn client(&self, id: NodeId) -> Option<Arc<Client>> {
        let known = |peers: &Self| {
            peers
                .map
                .read()
                .expect("peers lock")
                .get(&id)
                .map(|peer| peer.client.clone())
        };
        known(self).or_else(|| {
            self.refresh();
            known(self)
        })
    }

    /// The open connections to peers and their transports, for `hotpot status`.
    pub fn links(&self) -> Vec<PeerLink> {
        self.map
            .read()
            .expect("peers lock")
            .iter()
            .filter(|(_, peer)| peer.client.is_connected())
            .map(|(id, peer)| PeerLink {
                peer: *id,
                transport: peer.client.transport().to_string(),
                one_sided: peer.client.remote_bytes() > 0,
            })
            .collect()
    }

    /// Ids of every node this node knows, in id order.
    pub fn known(&self) -> Vec<NodeId> {
        self.map
            .read()
            .expect("peers lock")
            .keys()
            .copied()
            .collect()
    }

    /// Replaced by a promotion and counted down: what it held is on other nodes.
    pub fn is_lost(&self, id: NodeId) -> bool {
        self.successors
            .read()
            .expect("successors lock")
            .contains_key(&id)
            && !self.live().contains(&id)
    }

    /// Ids of the nodes currently live, in id order.
    pub fn live(&self) -> Vec<NodeId> {
        self.map
            .read()
            .expect("peers lock")
            .iter()
            .filter(|(_, peer)| peer.live)
            .map(|(id, _)| *id)
            .collect()
    }
}
