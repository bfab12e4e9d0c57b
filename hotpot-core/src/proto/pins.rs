//! Pins are leases (docs/design.md, "Published versions"): an owner keeps what a view pins
//! while the viewing node renews it, and lets it go once the node stopped renewing (it died,
//! restarted, or lost the owner). The book of when each pin was last renewed, in
//! milliseconds of the owner's own clock (virtual in the simulator), shared by the daemon
//! and the node machine. Volatile, as the pins themselves (`page/versions.rs`).

use std::collections::BTreeMap;

use crate::page::ViewKey;
use crate::proto::types::{DatasetId, FsError, NodeId};

/// An owner lets a pin go once it was not renewed for this long.
pub const PIN_LEASE_MS: u64 = 10_000;
/// How often a viewing node renews its pins (well inside the lease: a renewal or two may
/// be lost).
pub const PIN_RENEW_EVERY_MS: u64 = 2_000;

/// A pin refused: `node` no longer keeps `version` of `dataset` (the oldest it can serve is
/// `oldest`, `PageTable::pin_version`'s answer).
pub fn not_kept(version: u64, dataset: DatasetId, node: NodeId, oldest: u64) -> FsError {
    FsError::Stale(format!(
        "version {version} of dataset {dataset} is no longer kept on node {node} (oldest it \
         can serve: {oldest})"
    ))
}

#[derive(Debug, Default)]
pub struct PinLeases {
    renewed: BTreeMap<ViewKey, u64>,
}

impl PinLeases {
    /// `view` was pinned here at `now_ms` (again: the lease starts over).
    pub fn pinned(&mut self, view: ViewKey, now_ms: u64) {
        self.renewed.insert(view, now_ms);
    }

    /// The viewing node still has these views: each one pinned here starts over. A view
    /// not pinned here (unpinned, expired, or pinned before this owner restarted) stays
    /// unpinned: a renewal never pins.
    pub fn renew(&mut self, views: &[ViewKey], now_ms: u64) {
        for view in views {
            if let Some(renewed) = self.renewed.get_mut(view) {
                *renewed = (*renewed).max(now_ms);
            }
        }
    }

    pub fn unpinned(&mut self, view: ViewKey) {
        self.renewed.remove(&view);
    }

    /// The pins not renewed for `PIN_LEASE_MS` by `now_ms`, taken out of the book: the
    /// owner unpins them.
    pub fn expired(&mut self, now_ms: u64) -> Vec<ViewKey> {
        let old: Vec<ViewKey> = self
            .renewed
            .iter()
            .filter(|(_, renewed)| now_ms.saturating_sub(**renewed) >= PIN_LEASE_MS)
            .map(|(view, _)| *view)
            .collect();
        for view in &old {
            self.renewed.remove(view);
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_renewed_in_time_stays_and_one_left_alone_expires() {
        let mut leases = PinLeases::default();
        leases.pinned((2, 1), 0);
        leases.pinned((3, 1), 0);
        leases.renew(&[(2, 1)], PIN_LEASE_MS - 1);
        assert_eq!(leases.expired(PIN_LEASE_MS), vec![(3, 1)]);
        assert_eq!(leases.expired(PIN_LEASE_MS), Vec::<ViewKey>::new());
        assert_eq!(leases.expired(2 * PIN_LEASE_MS - 1), vec![(2, 1)]);
    }

    #[test]
    fn a_renewal_never_pins_and_an_unpin_ends_the_lease() {
        let mut leases = PinLeases::default();
        leases.renew(&[(2, 1)], 5);
        assert_eq!(leases.expired(5 + PIN_LEASE_MS), Vec::<ViewKey>::new());
        leases.pinned((2, 2), 0);
        leases.unpinned((2, 2));
        leases.renew(&[(2, 2)], 1);
        assert_eq!(leases.expired(PIN_LEASE_MS + 1), Vec::<ViewKey>::new());
    }

    #[test]
    fn a_late_renewal_does_not_move_the_lease_back() {
        let mut leases = PinLeases::default();
        leases.pinned((2, 1), 100);
        leases.renew(&[(2, 1)], 50);
        assert_eq!(leases.expired(PIN_LEASE_MS + 99), Vec::<ViewKey>::new());
        assert_eq!(leases.expired(PIN_LEASE_MS + 100), vec![(2, 1)]);
    }
}
