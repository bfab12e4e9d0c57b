//! The faults a seed injects into the world: node crashes (PM kept, torn, or power cut inside
//! a step), node loss within the replication degree, partitions that heal, and the healing at
//! the end of the workload after which the cluster must settle.

use std::collections::BTreeSet;
use std::sync::Arc;

use hotpot_core::pm::{SimRegion, TxRole};
use hotpot_core::proto::types::NodeId;
use rand::Rng;

use super::{Event, World, DISPATCHER, PM_BYTES};

impl World {
    pub(super) fn crash(&mut self, id: NodeId) {
        if self.healing {
            return;
        }
        let down = self
            .nodes
            .values()
            .filter(|node| node.machine.is_none() || node.dying)
            .count();
        if down == 0 {
            if self.options.crash_mid_step && self.rng.random_bool(0.5) {
                let persists = self.rng.random_range(0..3);
                let node = self.nodes.get_mut(&id).expect("node");
                node.region.cut_power_after(persists);
                node.dying = true;
                trace!(
                    self,
                    "n{id} loses power within {persists} persists of its next step"
                );
            } else {
                self.power_off(id, false);
            }
        }
        let next = self.rng.random_range(300..3_000);
        let victim = self.random_node();
        self.schedule(next, Event::Crash(victim));
    }

    /// The node stops; what a restart finds is its persisted image (with some unpersisted
    /// cache lines when writes tear), or nothing when its PM is lost. `held_before_step`: the
    /// power was cut inside a step, and before it the node held what only its PM holds (its
    /// memory after the step may have let go of it while the cut PM has not).
    pub(super) fn power_off(&mut self, id: NodeId, held_before_step: bool) {
        let losable = !held_before_step && self.can_lose(id);
        let wipe = self.options.wipes && self.rng.random_bool(0.3) && losable;
        // Replacing a node is losing what only its PM holds, as a wipe is (a replaced node
        // drops its copies when it is back, and nobody waits for its answers meanwhile): a
        // node whose loss would be beyond the replication degree comes back before the
        // dispatcher would promote another in its place (seed 13157567: a node replaced
        // while another rebuilt after a wipe held the last copies of the rebuilding node's
        // pages).
        let replaceable = self.options.promote_after_ms == 0 || losable;
        let torn_seed = self.rng.random();
        let node = self.nodes.get_mut(&id).expect("node");
        node.machine = None;
        node.kernel.clear();
        node.dying = false;
        node.joining = false;
        node.joined = None;
        let image = if wipe {
            vec![0u8; PM_BYTES]
        } else if self.options.torn_writes {
            node.region.crash_image_with_evictions(torn_seed)
        } else {
            node.region.crash_image()
        };
        node.region = Arc::new(SimRegion::from_image(image));
        node.rebuilding |= wipe;
        self.workload.node_crashed(id);
        trace!(self, "crash n{id}{}", if wipe { " (PM wiped)" } else { "" });
        let longest = if replaceable {
            self.outage_max_ms()
        } else {
            2_000
        };
        let back = self.rng.random_range(100..longest);
        self.schedule(back, Event::Restart(id));
    }

    /// Losing this node's PM (a wipe, or a promotion in its place) is within the replication
    /// degree: no other node down or rebuilding, the newest copy of every page on another
    /// node, and nothing whose only crash-surviving copy is here.
    fn can_lose(&self, id: NodeId) -> bool {
        // Another node lost (down, or still rebuilding) counts against the degree too.
        let others_whole = self.nodes.iter().all(|(other, node)| {
            *other == id || (node.machine.is_some() && !node.rebuilding && !node.dying)
        });
        others_whole
            && !self.holds_only_copy(id)
            && self.live_datasets().all(|(dataset, pages)| {
                dataset.params.replicas >= 2
                    && (0..*pages).all(|page| {
                        let key = (dataset.id, page);
                        let versions: Vec<(NodeId, u64)> = self
                            .nodes
                            .keys()
                            .filter_map(|node| {
                                self.persisted_version(*node, key).map(|v| (*node, v))
                            })
                            .collect();
                        let newest = versions.iter().map(|(_, v)| *v).max().unwrap_or(0);
                        newest == 0
                            || versions
                                .iter()
                                .any(|(node, version)| *node != id && *version == newest)
                    })
            })
    }

    /// A follower's part of a commit across owners has one copy that survives a crash (its
    /// own record) until it is decided: its targets' prepared copies are dropped when they
    /// restart. A leader's kept outcome is the only durable record that it decided: after its
    /// loss the targets' volatile memory must answer (docs/design.md, "What the simulator
    /// found", item 10). Losing such a node (its PM, or its place as an owner) is beyond what
    /// the protocol replicates.
    pub(super) fn holds_only_copy(&self, id: NodeId) -> bool {
        self.nodes[&id].machine.as_ref().is_some_and(|machine| {
            let table = machine.table();
            !table.outcomes_waiting().is_empty()
                || table
                    .pending()
                    .iter()
                    .any(|copies| copies.tag.role == TxRole::Follower)
        })
    }

    fn persisted_version(&self, node: NodeId, key: (u64, u64)) -> Option<u64> {
        let machine = self.nodes[&node].machine.as_ref()?;
        machine
            .table()
            .read_persisted(key)
            .map(|(version, _)| version)
    }

    pub(super) fn restart(&mut self, id: NodeId) {
        if self.nodes[&id].machine.is_some() || self.nodes[&id].joining {
            return;
        }
        self.boot(id);
    }

    pub(super) fn partition(&mut self, heal: bool) {
        if self.healing {
            return;
        }
        if heal {
            self.cut.clear();
            trace!(self, "partition healed");
            let next = self.rng.random_range(200..2_000);
            self.schedule(next, Event::Partition { heal: false });
            return;
        }
        // A random side against the rest (the dispatcher on either, sometimes); one
        // direction only, sometimes.
        let mut nodes: Vec<NodeId> = self.nodes.keys().copied().collect();
        if self.options.dispatcher_cut {
            nodes.push(DISPATCHER);
        }
        let side: BTreeSet<NodeId> = nodes
            .iter()
            .copied()
            .filter(|_| self.rng.random_bool(0.4))
            .collect();
        let one_way = self.options.one_way && self.rng.random_bool(0.5);
        for a in &side {
            for b in nodes.iter().filter(|node| !side.contains(node)) {
                self.cut.insert((*a, *b));
                if !one_way {
                    self.cut.insert((*b, *a));
                }
            }
        }
        trace!(
            self,
            "partition {side:?} vs rest{}",
            if one_way { " (one-way)" } else { "" }
        );
        let lasts = self.rng.random_range(100..self.outage_max_ms().max(3_000));
        self.schedule(lasts, Event::Partition { heal: true });
    }

    /// How long a crashed node stays down or a partition lasts, at most.
    fn outage_max_ms(&self) -> u64 {
        if self.options.promote_after_ms > 0 {
            8_000 // often long enough to be replaced
        } else if self.options.long_outages {
            6_000
        } else {
            2_000
        }
    }

    pub(super) fn heal(&mut self) {
        self.healing = true;
        self.cut.clear();
        self.restart_dispatcher();
        trace!(self, "heal: faults stop, down nodes restart");
        let down: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.machine.is_none() && !node.joining)
            .map(|(id, _)| *id)
            .collect();
        for id in down {
            self.boot(id);
        }
        // A node still due to lose power does so now, and comes back at once.
        let dying: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, node)| node.dying)
            .map(|(id, _)| *id)
            .collect();
        for id in dying {
            self.power_off(id, false);
            self.boot(id);
        }
    }
}
