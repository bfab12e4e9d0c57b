//! A read whose owner does not answer takes the newest copy a live node has (the reader's
//! failover). The owner never heard of that reader, so its next commit of the page did not
//! reach it: the reader kept serving the copy it took, for good. The reader now fetches the
//! page again from its owner once the owner answers, which makes it a holder the owner knows.

use hotpot_tests::{fuse_available, page_pattern, wait_until_reads, Cluster, Mapping};

fn read_file(cluster: &Cluster, node: u32) -> Vec<u8> {
    std::fs::read(cluster.mount(node).join("data"))
        .unwrap_or_else(|error| panic!("read on node {node}: {error}\n{}", cluster.node_log(node)))
}

#[test]
fn a_page_read_from_a_replica_while_its_owner_was_silent_gets_the_owners_next_commit() {
    if !fuse_available() {
        return;
    }
    // Nobody takes over the silent owner's chunks during the test.
    let cluster = Cluster::up_with(3, "64MiB", &[], &["--promote-after-ms", "600000"]);
    cluster.wait_views_settled();
    // One page, replicas 2: the owner and the next node hold it; the third reads it (a file
    // of one page: the kernel's readahead asks for nothing else).
    let path = cluster.create_chunked(1, "data", "4KiB", "mrsw", 2, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let replica = owner % 3 + 1;
    let reader = replica % 3 + 1;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cluster.mount(owner).join("data"))
        .expect("open on the owner");
    let mut mapping = Mapping::new(&file, 4096);
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    mapping.msync().expect("the first commit");

    // The owner stops answering; the reader's fetch times out and takes the replica's copy.
    let paused = cluster.pause(owner);
    assert_eq!(
        read_file(&cluster, reader),
        page_pattern(1, 0),
        "the read through the replica"
    );
    assert!(
        cluster
            .node_log(reader)
            .contains("owner unreachable: asking every live node for a copy"),
        "the reader did not fail over: {}",
        cluster.node_log(reader)
    );
    drop(paused);

    mapping.bytes()[..4096].copy_from_slice(&page_pattern(2, 0));
    mapping.msync().expect("the owner's next commit");
    wait_until_reads(
        &cluster,
        (reader, reader),
        || read_file(&cluster, reader),
        (&page_pattern(1, 0), &page_pattern(2, 0)),
        "still reads the copy it took while the owner was silent, after the owner's next commit",
    );
}
