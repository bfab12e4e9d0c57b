//! An owner that applied a commit alone and died before any other node got it is replaced
//! (a promotion); its successor commits the page again, under the same version number. Found
//! by hotpot-sim once the node machine took promotions: the replaced node came back with its
//! own copy, the successor counted it current (same version, other bytes) and programs on
//! the returning node read a commit that was never acknowledged, for good. A replaced node
//! now drops its copies at its start and takes the owners' copies.

use std::time::{Duration, Instant};

use hotpot_tests::{fuse_available, page_pattern, Cluster, Mapping};

const PAGES: u64 = 16;

#[test]
fn a_replaced_owner_comes_back_without_the_commit_only_it_applied() {
    if !fuse_available() {
        return;
    }
    // In the emulated rxe guest a live node's heartbeat can be late by more than 2 s.
    let promote_after = if std::env::var_os("RXEVM_GUEST").is_some() {
        "8000"
    } else {
        "2000"
    };
    let cluster = Cluster::up_with(3, "64MiB", &[], &["--promote-after-ms", promote_after]);
    cluster.wait_views_settled();
    // One chunk, one owner; the writer is another node.
    let path = cluster.create_chunked(1, "data", "64KiB", "mrsw", 2, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let writer = owner % 3 + 1;
    let file = cluster.open_rw(writer, "data");
    let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    mapping.msync().expect("the first commit");

    // The owner applies the second commit and dies before any other node gets it.
    cluster.arm_fault(owner, "owner.decided");
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(2, 0));
    assert!(
        mapping.msync().is_err(),
        "a commit whose owner died before the decision reached anyone was acknowledged"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.is_running(owner) {
        assert!(
            Instant::now() < deadline,
            "node {owner} did not die at owner.decided"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Its chunk gets a new owner, and the page a third commit (the same version number
    // the dead owner gave the second).
    let deadline = Instant::now() + Duration::from_secs(30);
    let successor = loop {
        let status = cluster.status_json();
        if let Some(by) = status["owners_replaced"][owner.to_string()].as_u64() {
            break by as u32;
        }
        assert!(
            Instant::now() < deadline,
            "node {owner} never replaced: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(3, 0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(error) = mapping.msync() {
        assert!(
            Instant::now() < deadline,
            "commits to the replaced owner's chunk failed for 30 s: {error}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cluster.first_page(successor, "data"), page_pattern(3, 0));

    // The replaced owner comes back with its PM: it must show the third commit, never the
    // second (applied by it alone, never acknowledged).
    cluster.start(owner);
    let back = cluster.first_page(owner, "data");
    assert!(
        back != page_pattern(2, 0),
        "node {owner} came back serving the commit only it had applied"
    );
    assert_eq!(
        back,
        page_pattern(3, 0),
        "node {owner} after its return does not show the third commit"
    );
    // And it follows the next commit.
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(4, 0));
    mapping
        .msync()
        .expect("a commit with the replaced node back");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.first_page(owner, "data") != page_pattern(4, 0) {
        assert!(
            Instant::now() < deadline,
            "node {owner} did not get the commit after its return"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("owner {owner} replaced by {successor}; writer {writer}");
}
