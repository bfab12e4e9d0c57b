//! The reader's role: bring a page this node lacks from its owner and keep a copy; when the
//! owner does not answer, take the newest copy any live node has (never zeros: a missing
//! copy cannot be told from a never-written page). Over a verbs link to an owner that
//! exposes its PM, the bytes are read one-sided: `Locate` (which makes this node a holder,
//! as `Fetch` does), RDMA READ of the frame, RDMA READ of the slot; an unchanged slot means
//! the frame held that version throughout, else (a commit moved the page meanwhile) the page
//! is fetched two-sided.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotpot_core::pm::{PageKey, PAGE_BYTES};
use hotpot_core::proto::messages::{NodeReply, NodeRequest, VersionedPage};
use hotpot_core::proto::types::{Dataset, DatasetId, FetchCounts, FsError, NodeId};
use hotpot_net::{multicall, Client, NetError};

use super::{pm_error, unreachable, Protocol, RPC_TIMEOUT};

#[derive(Default)]
pub(in crate::node) struct FetchCounters {
    two_sided: AtomicU64,
    one_sided: AtomicU64,
    one_sided_retried: AtomicU64,
}

impl FetchCounters {
    pub(in crate::node) fn counts(&self) -> FetchCounts {
        FetchCounts {
            two_sided: self.two_sided.load(Ordering::Relaxed),
            one_sided: self.one_sided.load(Ordering::Relaxed),
            one_sided_retried: self.one_sided_retried.load(Ordering::Relaxed),
        }
    }
}

/// What a one-sided attempt came to.
enum OneSided {
    Read(u64, Vec<u8>),
    /// Not possible for this page or link now: fetch two-sided.
    Fallback,
    /// The slot changed under the read: fetch two-sided.
    Moved,
    /// The owner did not answer `Locate`: asking it again would only wait as long again.
    Unreachable(NetError),
}

/// How long a reader asks again an owner that answers it does not own the page: right after
/// a promotion, the two may not have the same view yet (they agree within a heartbeat).
const VIEW_SETTLE: Duration = Duration::from_secs(3);

impl Protocol {
    /// Bring a page this node lacks from its owner (or, if the owner is unreachable, the
    /// newest copy any live node has) and keep a Committed copy. Returns its version and
    /// bytes (which a prepared copy of the page waiting here may have kept from being
    /// stored).
    pub fn fetch(&self, dataset: &Dataset, page: u64) -> Result<(u64, Vec<u8>), FsError> {
        let deadline = Instant::now() + VIEW_SETTLE;
        loop {
            match self.fetch_once(dataset, page) {
                Err(FsError::Busy(why)) if Instant::now() < deadline => {
                    tracing::debug!(page, %why, "owner views differ; asking again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                done => return done,
            }
        }
    }

    fn fetch_once(&self, dataset: &Dataset, page: u64) -> Result<(u64, Vec<u8>), FsError> {
        let owner = self.owner_of(dataset, page);
        if owner != self.id {
            match self.fetch_one_sided(owner, dataset.id, page) {
                OneSided::Read(version, bytes) => {
                    self.fetches.one_sided.fetch_add(1, Ordering::Relaxed);
                    self.table()
                        .install_copy((dataset.id, page), version, &bytes)
                        .map_err(pm_error)?;
                    return Ok((version, bytes));
                }
                OneSided::Moved => {
                    self.fetches
                        .one_sided_retried
                        .fetch_add(1, Ordering::Relaxed);
                }
                OneSided::Fallback => {}
                OneSided::Unreachable(error) => {
                    let (version, bytes) = self.fetch_any_copy(dataset.id, page, owner, &error)?;
                    self.table()
                        .install_copy((dataset.id, page), version, &bytes)
                        .map_err(pm_error)?;
                    self.note_failed_over((dataset.id, page), owner);
                    return Ok((version, bytes));
                }
            }
        }
        self.fetches.two_sided.fetch_add(1, Ordering::Relaxed);
        let request = NodeRequest::Fetch {
            dataset: dataset.id,
            page,
            from: self.id,
        };
        let mut failed_over = false;
        let (version, bytes) = match self.call(owner, &request) {
            Ok(NodeReply::Page(copy)) if copy.bytes.is_empty() => {
                (copy.version, vec![0u8; PAGE_BYTES])
            }
            Ok(NodeReply::Page(copy)) => (copy.version, copy.bytes),
            Ok(NodeReply::Failed(error)) => return Err(error),
            Ok(other) => {
                return Err(FsError::Io(format!(
                    "owner {owner} sent {other:?} for a fetch"
                )))
            }
            Err(error) if unreachable(&error) => {
                failed_over = true;
                self.fetch_any_copy(dataset.id, page, owner, &error)?
            }
            Err(error) => return Err(FsError::Io(format!("fetch from owner {owner}: {error}"))),
        };
        if bytes.len() != PAGE_BYTES {
            return Err(FsError::Io(format!(
                "owner {owner} sent a page of {} bytes",
                bytes.len()
            )));
        }
        self.table()
            .install_copy((dataset.id, page), version, &bytes)
            .map_err(pm_error)?;
        if failed_over {
            self.note_failed_over((dataset.id, page), owner);
        }
        Ok((version, bytes))
    }

    /// A copy taken while `owner` did not answer: the owner has not recorded this node as a
    /// holder, so its commits would not reach it. Fetched again from the owner (resolver).
    fn note_failed_over(&self, key: PageKey, owner: NodeId) {
        self.failed_over
            .lock()
            .expect("failed-over lock")
            .insert(key, owner);
    }

    /// Resolver round: fetch again, from their owners now live, the pages taken elsewhere
    /// while the owner was silent; the fetch makes this node a holder the owner knows, and a
    /// newer version replaces the copy (and drops the kernel's cached page).
    pub(in crate::node) fn refetch_failed_over(&self) {
        let waiting: Vec<(PageKey, NodeId)> = self
            .failed_over
            .lock()
            .expect("failed-over lock")
            .iter()
            .map(|(key, owner)| (*key, self.peers.resolve(*owner)))
            .collect();
        let live = self.peers.live();
        for ((dataset, page), owner) in waiting {
            if owner != self.id && !live.contains(&owner) {
                continue;
            }
            let request = NodeRequest::Fetch {
                dataset,
                page,
                from: self.id,
            };
            let copy = if owner == self.id {
                None // promoted in the owner's place: the rejoin of its holders covers it
            } else {
                match self.call(owner, &request) {
                    Ok(NodeReply::Page(copy)) => Some(copy),
                    Ok(NodeReply::Failed(error)) => {
                        tracing::debug!(owner, %error, "owner cannot answer yet; fetching again later");
                        continue;
                    }
                    Ok(other) => {
                        tracing::warn!(owner, ?other, "unexpected answer to a fetch");
                        continue;
                    }
                    Err(error) => {
                        tracing::debug!(owner, %error, "owner still silent; fetching again later");
                        continue;
                    }
                }
            };
            if let Some(copy) = copy {
                let version = copy.version;
                if let Err(error) = self.install(dataset, &[copy]) {
                    tracing::error!(%error, "cannot keep the owner's copy");
                    continue;
                }
                if self.table().version_of((dataset, page)) < version {
                    // A prepared copy of the page waits here and kept the owner's back: if
                    // it is aborted, the copy taken during failover would stay (found by
                    // hotpot-sim). Asked again once it is settled.
                    continue;
                }
            }
            tracing::info!(
                owner,
                dataset,
                page,
                "a page taken during failover is known to its owner again"
            );
            self.failed_over
                .lock()
                .expect("failed-over lock")
                .remove(&(dataset, page));
        }
    }

    /// The one-sided path (see the module comment); any failure falls back to `Fetch`.
    fn fetch_one_sided(&self, owner: NodeId, dataset: DatasetId, page: u64) -> OneSided {
        let Ok(client) = self.client(owner) else {
            return OneSided::Fallback;
        };
        if client.remote_bytes() == 0 {
            return OneSided::Fallback;
        }
        let request = NodeRequest::Locate {
            dataset,
            page,
            from: self.id,
        };
        let location = match client.call(&request, RPC_TIMEOUT) {
            Ok(NodeReply::Located(Some(location))) => location,
            Err(error) if unreachable(&error) => return OneSided::Unreachable(error),
            _ => return OneSided::Fallback,
        };
        let mut bytes = vec![0u8; PAGE_BYTES];
        let mut slot = vec![0u8; location.slot.len()];
        let read = client
            .remote_read(location.frame_offset, &mut bytes)
            .and_then(|()| client.remote_read(location.slot_offset, &mut slot));
        match read {
            Err(error) => {
                tracing::debug!(owner, %error, "one-sided read failed");
                OneSided::Fallback
            }
            Ok(()) if location.holds(&bytes, &slot) => OneSided::Read(location.version, bytes),
            Ok(()) => OneSided::Moved,
        }
    }

    pub(super) fn fetch_any_copy(
        &self,
        dataset: DatasetId,
        page: u64,
        owner: NodeId,
        why: &NetError,
    ) -> Result<(u64, Vec<u8>), FsError> {
        tracing::warn!(owner, %why, dataset, page, "owner unreachable: asking every live node for a copy");
        let others: Vec<Arc<Client>> = self
            .peers
            .live()
            .into_iter()
            .filter(|node| *node != owner && *node != self.id)
            .filter_map(|node| self.peers.client(node))
            .collect();
        let replies = multicall::<_, NodeReply>(
            &others,
            &NodeRequest::FetchCopy { dataset, page },
            RPC_TIMEOUT,
        );
        replies
            .into_iter()
            .filter_map(|reply| match reply {
                Ok(NodeReply::Copy(Some(copy))) => Some((copy.version, copy.bytes)),
                _ => None,
            })
            .max_by_key(|(version, _)| *version)
            .ok_or_else(|| {
                FsError::Io(format!(
                    "owner {owner} of page {page} of dataset {dataset} is unreachable and no live node has a copy"
                ))
            })
    }

    /// `FetchCopies`: this node's persisted copies of `pages` of `dataset` (`None`: of every
    /// page it has a copy of).
    pub fn serve_copies(&self, dataset: DatasetId, pages: Option<&[u64]>) -> NodeReply {
        let keys: Vec<_> = match pages {
            Some(pages) => pages.iter().map(|page| (dataset, *page)).collect(),
            None => self
                .table()
                .copied_pages(dataset)
                .into_iter()
                .map(|page| (dataset, page))
                .collect(),
        };
        NodeReply::Pages(self.persisted_copies(&keys))
    }

    /// This node's persisted copies of those of `keys` it has (never staged bytes).
    pub(in crate::node) fn persisted_copies(
        &self,
        keys: &[hotpot_core::pm::PageKey],
    ) -> Vec<VersionedPage> {
        let table = self.table();
        keys.iter()
            .filter_map(|key| {
                table
                    .read_persisted(*key)
                    .map(|(version, bytes)| VersionedPage {
                        page: key.1,
                        version,
                        bytes,
                    })
            })
            .collect()
    }

    pub fn serve_copy(&self, dataset: DatasetId, page: u64) -> NodeReply {
        let copy = self.table().read_persisted((dataset, page));
        NodeReply::Copy(copy.map(|(version, bytes)| VersionedPage {
            page,
            version,
            bytes,
        }))
    }
}
