//! A node stops whole when one of its threads panics (fail-stop, `tools/src/main.rs`). Found by
//! the chaos test: the MRMW home's version sequencer panicked in an RPC worker, the poisoned
//! lock then killed its heartbeat thread, and the node, counted down by its peers but still
//! mounted, read acknowledged commits of other nodes old for good. A stopped node is a crash:
//! it restarts on its PM file and catches up.

use std::time::{Duration, Instant};

use hotpot_tests::{fuse_available, page_pattern, Cluster, Mapping};

const PAGES: u64 = 16;

#[test]
fn a_panic_in_any_thread_stops_the_node() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "64MiB");
    cluster.wait_views_settled();
    // One chunk, one owner; replicas 2: the owner and the next live node in id order, whose
    // RPC worker applies the Decide.
    let path = cluster.create_chunked(1, "data", "64KiB", "mrsw", 2, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let replica = owner % 3 + 1;
    cluster.arm_fault(replica, "panic:target.deciding");

    let file = cluster.open_rw(owner, "data");
    let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    // In doubt (EIO) or not, depending on when the owner hears of the replica's end; the
    // node's end is what this test is about.
    let _ = mapping.msync();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.is_running(replica) {
        assert!(
            Instant::now() < deadline,
            "node {replica} still runs 10 s after a thread of it panicked: {}",
            cluster.node_log(replica)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = cluster.node_log(replica);
    assert!(
        log.contains("panic at target.deciding") && log.contains("the process stops"),
        "node {replica} ended without saying it stopped for the panic: {log}"
    );

    // Restarted on its PM file (the fault is not armed again), it holds the commit.
    cluster.start(replica);
    mapping.bytes()[4096..8192].copy_from_slice(&page_pattern(2, 1));
    mapping
        .msync()
        .expect("a commit with the restarted replica is acknowledged");
    assert_eq!(cluster.first_page(replica, "data"), page_pattern(1, 0));
}
