//! Pages: one node's table of page copies in their morphable states (Committed, Redundant,
//! Dirty with twin) over the PM pool.

pub mod table;

pub use table::{PageState, PageTable, ReadOutcome};
