//! Pages: one node's table of page copies in their morphable states (Committed, Redundant,
//! Dirty with twin) over the PM pool.

pub mod copies;
pub mod merge;
pub mod sharing;
pub mod table;
pub mod versions;

pub use copies::{CommitError, Decided, DirtySnapshot, OwnedPage, PendingCopies, TxKey};
pub use merge::{apply_runs, diff_runs, Run};
pub use sharing::{Merger, Sharing};
pub use table::{PageState, PageTable, ReadOutcome};
pub use versions::{KeptForCommit, PinUsage, ViewKey};
