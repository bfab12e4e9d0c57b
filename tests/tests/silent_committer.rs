//! A committer its owner counts as down (it was silent, or is cut off from the dispatcher
//! only) is up all the same: it sent the commit. Found by hotpot-sim: the owner left such a
//! committer out of its own commit's copies, so the program that had just committed read its
//! old bytes back, and its next commit, diffed against those old bytes, lost every byte it
//! wrote back to its old value. The committer now always gets its commit's bytes.

use hotpot_tests::{fuse_available, page_pattern, Cluster, Mapping};

const PAGES: u64 = 16;

#[test]
fn a_committer_counted_down_reads_its_commit_back_and_its_next_commit_is_whole() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "64MiB");
    cluster.wait_views_settled();
    // One chunk, one owner, one copy: the writer's copy is its own.
    let path = cluster.create_chunked(1, "data", "64KiB", "mrmw", 1, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let writer = owner % 3 + 1;
    let file = cluster.open_rw(writer, "data");
    let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
    // The mapping holds the file; no descriptor stays open. Every close of a descriptor on a
    // FUSE file waits for its daemon (FLUSH), and each program this test starts while the
    // writer is paused closes its inherited copy at exec.
    drop(file);
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    mapping.msync().expect("the first commit");

    // The writer goes silent until its owner counts it as down; then the dispatcher goes,
    // so the owner's view stays so while the writer is back and commits.
    let paused = cluster.pause(writer);
    cluster.wait_counted_down(owner, writer);
    cluster.kill_dispatcher();
    drop(paused);

    mapping.bytes()[..4096].copy_from_slice(&page_pattern(2, 0));
    mapping
        .msync()
        .expect("a commit while the owner counts the writer down");
    assert!(
        mapping.bytes()[..4096] == page_pattern(2, 0)[..],
        "node {writer} read its own acknowledged commit back old"
    );
    // Back to the first bytes: every one of them differs from what the owner holds.
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    mapping.msync().expect("the third commit");
    cluster.start_dispatcher();
    assert_eq!(
        cluster.first_page(owner, "data"),
        page_pattern(1, 0),
        "the owner, node {owner}, lost bytes node {writer} wrote back to their old value"
    );
}
