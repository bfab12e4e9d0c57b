//! The simulated dispatcher: hotpot-core's dispatcher state machine (the one `hotpot
//! dispatcher` runs), persisted after every change that matters before it answers, as the
//! real runtime does. A crash loses everything not persisted (heartbeats, volatile fields);
//! a restart reloads the persisted bytes.

use std::collections::BTreeMap;

use hotpot_core::pm::PAGE_BYTES;
use hotpot_core::proto::dispatcher::DispatcherState;
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest};
use hotpot_core::proto::types::{Dataset, DatasetParams, Mode, NodeId};

use crate::options::Options;

pub(crate) struct SimDispatcher {
    live: Option<DispatcherState>,
    persisted: Vec<u8>,
    /// How many times it started (names its connections, like a node's incarnation).
    pub(crate) incarnation: u64,
    /// When this start began: its clock counts from here, as the daemon's does (a node it
    /// has not heard from since counts as live for one timeout after a restart).
    started_ms: u64,
    /// Its `--promote-after-ms` (a setting, given again at every start).
    promote_after_ms: u64,
}

impl SimDispatcher {
    /// `datasets`: the cluster's datasets, made before it started, with their pages (files
    /// `d1`, `d2`, … at the root; their first blocks are their first homes').
    pub(crate) fn new(
        cluster_id: u64,
        options: &Options,
        datasets: &[(Dataset, u64)],
    ) -> SimDispatcher {
        let promote_after_ms = options.promote_after_ms;
        let params = DatasetParams {
            mode: Mode::Mrsw,
            replicas: 2,
            chunk_pages: 4,
        };
        let mut state = DispatcherState::new(cluster_id, params, 0);
        state.set_promote_after_ms(promote_after_ms);
        state.set_version_block(options.version_block);
        for (dataset, pages) in datasets {
            let name = format!("d{}", dataset.id);
            state
                .add_made_dataset(&name, dataset.clone(), pages * PAGE_BYTES as u64)
                .expect("the world's datasets have names of their own");
        }
        let persisted = serde_json::to_vec(&state).expect("dispatcher state serialises");
        SimDispatcher {
            live: Some(state),
            persisted,
            incarnation: 1,
            started_ms: 0,
            promote_after_ms,
        }
    }

    pub(crate) fn is_up(&self) -> bool {
        self.live.is_some()
    }

    /// One request; `None` while down. State that changed is persisted before the answer.
    pub(crate) fn handle(
        &mut self,
        request: DispatcherRequest,
        now_ms: u64,
    ) -> Option<DispatcherReply> {
        let state = self.live.as_mut()?;
        let clock_ms = now_ms - self.started_ms;
        let (reply, changed) = state.handle(request, clock_ms, now_ms * 1_000_000);
        if changed {
            self.persisted = serde_json::to_vec(state).expect("dispatcher state serialises");
        }
        Some(reply)
    }

    /// Its promotions: a lost node → the node that owns its chunks now (persisted before
    /// any answer, so a crash keeps them).
    pub(crate) fn successors(&self) -> BTreeMap<NodeId, NodeId> {
        self.read_state(|state| state.successors().clone())
    }

    /// How many times each node joined, as its views name them (persisted with the rest).
    pub(crate) fn incarnations(&self) -> BTreeMap<NodeId, u64> {
        self.read_state(|state| state.incarnations().clone())
    }

    /// `read` of its state: the live one, or while it is down the one it persisted.
    fn read_state<T>(&self, read: impl FnOnce(&DispatcherState) -> T) -> T {
        match &self.live {
            Some(state) => read(state),
            None => read(
                &serde_json::from_slice::<DispatcherState>(&self.persisted)
                    .expect("persisted dispatcher state reloads"),
            ),
        }
    }

    pub(crate) fn crash(&mut self) {
        self.live = None;
    }

    pub(crate) fn restart(&mut self, now_ms: u64) {
        let mut state: DispatcherState =
            serde_json::from_slice(&self.persisted).expect("persisted dispatcher state reloads");
        state.set_promote_after_ms(self.promote_after_ms);
        self.live = Some(state);
        self.incarnation += 1;
        self.started_ms = now_ms;
    }
}
