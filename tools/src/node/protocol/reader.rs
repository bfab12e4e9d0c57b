//! The reader's role: bring a page this node lacks from its owner and keep a copy; when the
//! owner does not answer, take the newest copy any live node has (never zeros: a missing
//! copy cannot be told from a never-written page).

use std::sync::Arc;

use hotpot_core::pm::PAGE_BYTES;
use hotpot_core::proto::messages::{NodeReply, NodeRequest, VersionedPage};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, NodeId};
use hotpot_net::{multicall, Client, NetError};

use super::{pm_error, unreachable, Protocol, RPC_TIMEOUT};

impl Protocol {
    /// Bring a page this node lacks from its owner (or, if the owner is unreachable, the
    /// newest copy any live node has) and keep a Committed copy. Returns its bytes.
    pub fn fetch(&self, dataset: &Dataset, page: u64) -> Result<Vec<u8>, FsError> {
        let owner = self.owner_of(dataset, page);
        let request = NodeRequest::Fetch {
            dataset: dataset.id,
            page,
            from: self.id,
        };
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
        Ok(bytes)
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

    pub fn serve_copies(&self, dataset: DatasetId, pages: &[u64]) -> NodeReply {
        let keys: Vec<_> = pages.iter().map(|page| (dataset, *page)).collect();
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
