//! Pages: one node's table of page copies in their morphable states (Committed, Redundant,
//! Dirty with twin) over the PM pool.

pub mod copies;
pub mod table;

pub use copies::{CommitError, DirtySnapshot, OwnedPage, TxKey};
pub use table::{PageState, PageTable, ReadOutcome};
