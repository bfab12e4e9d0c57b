//! A node restarts after its own MRMW commit reached its owner but not its own copy (it died
//! taking the decision), and the owner does not answer its rejoin: the node's stored copy is
//! one commit behind, and nobody has confirmed it. Found by hotpot-sim (finding 20 in
//! docs/design.md): a write staged on such a copy is diffed against bytes the owner no longer
//! has, so every byte written back to its value in that stale copy is lost. Until the owner
//! confirms, the node now takes such pages from the owner (or, while it is silent, the newest
//! copy another node has), as if it held none.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use hotpot_tests::{fuse_available, node_in, page_pattern, Cluster};

/// Wait until `node`'s heartbeat reports `owners` as the owners that have not confirmed its
/// copies (`hotpot status`).
fn wait_unconfirmed_by(cluster: &Cluster, node: u32, owners: &[u32]) {
    let what = format!("node {node} reports copies unconfirmed by {owners:?}");
    cluster.wait_for_status(Duration::from_secs(15), &what, |status| {
        let reported = node_in(status, node)["usage"]["recovery"]["unconfirmed_by"].as_array();
        reported.is_some_and(|ids| {
            ids.iter()
                .map(|id| id.as_u64())
                .eq(owners.iter().map(|id| Some(*id as u64)))
        })
    });
}

#[test]
fn a_write_on_a_copy_its_owner_has_not_confirmed_since_a_restart_is_whole() {
    if !fuse_available() {
        return;
    }
    // Nobody takes over the silent owner's chunk during the test.
    let cluster = Cluster::up_with(3, "64MiB", &[], &["--promote-after-ms", "600000"]);
    cluster.wait_views_settled();
    // One chunk, one owner, a copy on every node.
    let path = cluster.create_chunked(1, "data", "64KiB", "mrmw", 3, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let writer = owner % 3 + 1;
    let first = page_pattern(1, 0);
    let second = page_pattern(2, 0);

    let file = cluster.open_rw(writer, "data");
    file.write_all_at(&first, 0).unwrap();
    file.sync_all().expect("the first commit");
    // The second commit is applied at the owner and the third node; the writer dies taking
    // its own copy's decision, and comes back with the first.
    cluster.arm_fault(writer, "target.deciding");
    file.write_all_at(&second, 0).unwrap();
    let _in_doubt = file.sync_all();
    drop(file);
    cluster.wait_crashed_at(writer, "target.deciding", Duration::from_secs(20));
    assert_eq!(cluster.first_page(owner, "data"), second);

    // The owner goes silent; the writer rejoins without its confirmation.
    let paused = cluster.pause(owner);
    // The dispatcher counts it down (a starting node leaves it out then).
    let what = format!("the dispatcher counts node {owner} down");
    cluster.wait_for_status(Duration::from_secs(20), &what, |status| {
        node_in(status, owner)["live"] == false
    });
    let restarting = Instant::now();
    cluster.start(writer);
    println!("node {writer} rejoined in {:?}", restarting.elapsed());
    assert!(
        cluster
            .node_log(writer)
            .contains("copies not confirmed by their owner"),
        "node {writer} rejoined with its copies confirmed: {}",
        cluster.node_log(writer)
    );
    wait_unconfirmed_by(&cluster, writer, &[owner]);

    // The program overwrites the page whole: 8 new bytes, the rest the first commit's bytes
    // (equal to the writer's stale copy, not to the owner's).
    let mut mine = first.clone();
    mine[..8].fill(0x5a);
    let file = cluster.open_rw(writer, "data");
    let writing = Instant::now();
    file.write_all_at(&mine, 0).unwrap();
    println!("the write took {:?}", writing.elapsed());
    drop(paused);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(error) = file.sync_all() {
        assert!(
            Instant::now() < deadline,
            "the writer's commit failed for 30 s: {error}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(file);
    // Back, the owner confirms the writer's copies at its resolver's next round.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cluster
        .node_log(writer)
        .contains("owner confirmed this node's copies")
    {
        assert!(
            Instant::now() < deadline,
            "node {writer}'s copies still unconfirmed: {}",
            cluster.node_log(writer)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_unconfirmed_by(&cluster, writer, &[]);
    let committed = cluster.first_page(owner, "data");
    let kept_stale = committed
        .iter()
        .zip(&mine)
        .filter(|(got, wrote)| got != wrote)
        .count();
    assert_eq!(
        kept_stale, 0,
        "{kept_stale} bytes the program wrote kept the owner's value (diffed against the \
         writer's unconfirmed copy)"
    );
}
