//! The YCSB core workload's parts, faithful to YCSB's own definitions (REFERENCE.md): key
//! choosers and the report format. The runner that drives a database with them builds on these.

pub mod generator;
pub mod lmdb;
pub mod report;
pub mod runner;
