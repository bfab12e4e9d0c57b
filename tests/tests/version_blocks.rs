//! An MRMW dataset's home hands out dataset versions from blocks of 1,024 (docs/design.md,
//! "Dataset versions"). With its block used up and the next commit not yet made, asked for the
//! latest version (`hotpot stat` asks), the home panicked in an RPC worker, and the poisoned
//! lock then took down its heartbeat; the chaos test saw that node read other nodes'
//! acknowledged commits old. The latest version is the block's last; the next commit takes
//! the next block.

use std::time::Duration;

use hotpot_core::proto::dispatcher::VERSION_BLOCK;
use hotpot_tests::{fuse_available, Cluster, Mapping};

#[test]
fn the_latest_version_is_answered_when_the_homes_block_is_used_up() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(1, "64MiB");
    let path = cluster.create(1, "data", "64KiB", "mrmw", 1);
    let file = cluster.open_rw(1, "data");
    let mut mapping = Mapping::new(&file, 4096);
    // The dataset's first block is 1..=VERSION_BLOCK: one version per commit.
    for commit in 1..=VERSION_BLOCK {
        mapping.bytes()[..8].copy_from_slice(&commit.to_le_bytes());
        mapping
            .msync()
            .unwrap_or_else(|error| panic!("commit {commit}: {error}"));
    }
    let stat = cluster.stat_json(&path);
    assert_eq!(
        stat["version"].as_u64(),
        Some(VERSION_BLOCK),
        "the latest version with the home's block used up: {stat}"
    );
    // The next commit takes a new block, which starts right after the first.
    mapping.bytes()[..8].copy_from_slice(&0u64.to_le_bytes());
    mapping.msync().expect("the commit after a used-up block");
    let stat = cluster.stat_json(&path);
    assert_eq!(
        stat["version"].as_u64(),
        Some(VERSION_BLOCK + 1),
        "the latest version after the next commit: {stat}"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        cluster.is_running(1),
        "the home stopped: {}",
        cluster.node_log(1)
    );
}
