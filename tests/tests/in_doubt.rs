//! An owner acknowledges a commit only once the dataset's copies hold the decided bytes
//! (hotpot-core/src/proto/replication.rs). Found by hotpot-sim: the owner acknowledged a commit whose
//! only replica had missed the Decide; that replica's prepared copy is dropped at its
//! restart, so losing the owner then lost an acknowledged commit. Now the program gets EIO
//! ("in doubt"), and the commit, applied at the owner, still reaches every node.

use std::io::Read;
use std::time::{Duration, Instant};

use hotpot_tests::{fuse_available, page_pattern, Cluster, Mapping};

const PAGES: u64 = 16;

fn read_all(cluster: &Cluster, node: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::fs::File::open(cluster.mount(node).join("data"))
        .unwrap_or_else(|error| panic!("open on node {node}: {error}"))
        .read_to_end(&mut bytes)
        .unwrap_or_else(|error| panic!("read on node {node}: {error}"));
    bytes
}

fn page(bytes: &[u8], page: u64) -> &[u8] {
    &bytes[(page * 4096) as usize..((page + 1) * 4096) as usize]
}

#[test]
fn a_commit_whose_replica_missed_the_decision_is_not_acknowledged() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "64MiB");
    // The owner must count the replica below as live, not only the dispatcher.
    cluster.wait_views_settled();
    // One chunk, one owner; replicas 2: the owner and the next live node in id order.
    let path = cluster.create_chunked(1, "data", "64KiB", "mrsw", 2, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let replica = owner % 3 + 1;
    cluster.arm_fault(replica, "target.deciding");

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cluster.mount(owner).join("data"))
        .expect("open on the owner");
    let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    let first = mapping.msync();
    cluster.wait_crashed_at(replica, "target.deciding", Duration::from_secs(10));
    let error =
        first.expect_err("a commit whose only replica missed the decision was acknowledged");
    assert_eq!(error.raw_os_error(), Some(libc::EIO), "{error}");
    assert!(
        cluster.node_log(owner).contains("in doubt"),
        "the owner's log does not say why: {}",
        cluster.node_log(owner)
    );

    // Applied at the owner: the bytes are there, and the replica gets them back.
    assert_eq!(page(&read_all(&cluster, owner), 0), &page_pattern(1, 0)[..]);
    cluster.start(replica);
    mapping.bytes()[4096..8192].copy_from_slice(&page_pattern(2, 1));
    mapping
        .msync()
        .expect("the next commit, with the replica back, is acknowledged");
    for node in 1..=3 {
        let bytes = read_all(&cluster, node);
        assert_eq!(
            page(&bytes, 0),
            &page_pattern(1, 0)[..],
            "page 0 on node {node}"
        );
        assert_eq!(
            page(&bytes, 1),
            &page_pattern(2, 1)[..],
            "page 1 on node {node}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stat = cluster.stat_json(&path);
        if stat["min_copies"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pages stayed below two copies: {stat}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
