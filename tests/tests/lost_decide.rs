//! A committer that missed the Decide of its own acknowledged MRMW commit (as a holder of the
//! page) has the new copy prepared, waiting, and its older copy stored. Its next commit of
//! the page must not be diffed against that older copy: the bytes the program writes back to
//! their older values would not be sent, and the owner would keep the acknowledged commit's
//! bytes there, a torn page. Found by hotpot-sim (seed 10081251) in the node machine; the
//! daemon had it too: a page with a newer copy prepared here is read from its owner.

use hotpot_tests::{fuse_available, Cluster, Mapping};

const PAGES: u64 = 16;
/// The bytes of the page the commits write.
const SLOT: usize = 64;

#[test]
fn a_commit_after_a_lost_decide_of_the_last_one_is_not_torn() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "64MiB");
    cluster.wait_views_settled();
    // One chunk, one owner; replicas 2. The writer and the other node both hold the page,
    // so a commit is acknowledged with the writer's Decide lost (the owner and the other
    // holder have the decided bytes).
    let path = cluster.create_chunked(1, "data", "64KiB", "mrmw", 2, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let writer = owner % 3 + 1;
    let other = writer % 3 + 1;

    let file = cluster.open_rw(writer, "data");
    let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
    mapping.bytes()[..SLOT].fill(1);
    mapping.msync().expect("the first commit");
    assert_eq!(cluster.first_page(other, "data")[..SLOT], [1; SLOT]);

    // The second commit's Decide never reaches the writer: its copy waits prepared.
    cluster.arm_fault(writer, "drop:target.deciding");
    mapping.bytes()[..SLOT].fill(2);
    mapping
        .msync()
        .expect("acknowledged: the owner and the other holder have it");
    assert!(
        cluster
            .node_log(writer)
            .contains("dropping the request at target.deciding"),
        "the writer's Decide was not dropped: {}",
        cluster.node_log(writer)
    );
    cluster.arm_fault(writer, "none");

    // At once (before the writer settles its prepared copy): half the bytes back to the
    // first commit's value, half new.
    let third: Vec<u8> = (0..SLOT).map(|i| if i % 2 == 0 { 1 } else { 3 }).collect();
    mapping.bytes()[..SLOT].copy_from_slice(&third);
    mapping.msync().expect("the third commit");
    let at_owner = cluster.first_page(owner, "data");
    assert_eq!(
        at_owner[..SLOT],
        third[..],
        "the owner's page is not the third commit (bytes equal to the first commit's were \
         not sent: it was diffed against the copy the lost Decide left behind)"
    );
}
