//! A holder that was silent while its page's owner restarted (design.md, "What the simulator
//! found", item 30). The owner learns who holds its pages again at every start, asking each
//! live peer; one the dispatcher counts as down is not waited for, and an owner's list of
//! holders is volatile, so the restarted owner no longer knew of it. A holder that was only
//! stalled or cut off does not restart, so it never registered either: the owner's commits
//! left it out and it read its old copy for good. A holder that sees an owner's incarnation
//! rise now registers its copies with it again and reads through it until it confirms.

use hotpot_tests::{fuse_available, page_pattern, wait_until_reads, Cluster, Mapping};

const PAGES: u64 = 16;

#[test]
fn a_holder_silent_through_its_owners_restart_still_gets_later_commits() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "64MiB");
    cluster.wait_views_settled();
    // One chunk, one owner; the writer and the holder are the two other nodes.
    let path = cluster.create_chunked(1, "data", "64KiB", "mrsw", 2, "64KiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let writer = owner % 3 + 1;
    let holder = writer % 3 + 1;

    let file = cluster.open_rw(writer, "data");
    let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(1, 0));
    mapping.msync().expect("the first commit");
    assert_eq!(cluster.first_page(holder, "data"), page_pattern(1, 0));

    // The holder stops answering; the owner restarts (PM kept) while the dispatcher counts
    // the holder as down, so its rejoin does not wait for it.
    let paused = cluster.pause(holder);
    cluster.wait_counted_down(owner, holder);
    cluster.kill(owner);
    cluster.start(owner);
    drop(paused);

    mapping.bytes()[..4096].copy_from_slice(&page_pattern(2, 0));
    mapping.msync().expect("a commit after the owner's restart");

    wait_until_reads(
        &cluster,
        (holder, holder),
        || cluster.first_page(holder, "data"),
        (&page_pattern(1, 0), &page_pattern(2, 0)),
        &format!(
            "still reads the page as it was before its owner, node {owner}, restarted, after \
             the next commit"
        ),
    );
    let stat = cluster.stat_json(&path);
    assert!(
        stat["min_copies"].as_u64().unwrap_or(0) >= 2,
        "pages below two copies: {stat}"
    );
}
