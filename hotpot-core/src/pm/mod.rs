//! Persistent memory: the pool file's layout, its region backends and the pool.

pub mod layout;
pub mod pool;
pub mod region;

#[cfg(test)]
pub(crate) mod crash_tests;

pub use layout::{CopyState, TxRole, TxTag, PAGE_BYTES};
pub use pool::{PageKey, PersistedPage, Pool, PoolUsage, Prepared, RecoveryReport, SlotChange};
pub use region::{create_file, Durability, MappedRegion, Region, SimRegion};

/// Errors of the PM pool. Each says what was found and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum PmError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "not a hotpot PM file (no hotpot superblock, and not empty): refusing to overwrite it"
    )]
    Foreign,
    #[error("PM file is damaged: {what}")]
    Corrupt { what: String },
    #[error("PM file is already in use by another process: {path}")]
    InUse { path: String },
    #[error("PM file is not this node's: {what}")]
    WrongOwner { what: String },
    #[error("PM pool is full ({frames} frames)")]
    Full { frames: u32 },
    #[error("redo log has no run of {blocks} free blocks")]
    LogFull { blocks: usize },
}
