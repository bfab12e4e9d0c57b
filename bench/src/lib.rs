//! Parts of hotpot's benchmarks that programs and tests share: the YCSB core workload's key
//! choosers and report format.

pub mod passthrough;
pub mod ycsb;
