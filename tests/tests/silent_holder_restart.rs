//! A holder that was silent while its page's owner restarted (design.md, "What the simulator
//! found", item 30). The owner learns who holds its pages again at every start, asking each
//! live peer; one the dispatcher counts as down is not waited for, and an owner's list of
//! holders is volatile, so the restarted owner no longer knew of it. A holder that was only
//! stalled or cut off does not restart, so it never registered either: the owner's commits
//! left it out and it read its old copy for good. A holder that sees an owner's incarnation
//! rise now registers its copies with it again and reads through it until it confirms.
//! A page the holder's kernel read before anything wrote it must get the commit that first
//! writes it too (item 34, found in the node machine, which keeps no copy of such a page
//! and so drops it from the kernel when it sees the restart; the daemon stores the zeros it
//! fetched as a copy, which it registers). A program's mapping shows what the kernel keeps.

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
    // A program on the holder maps the file and reads page 1, which nothing wrote yet.
    let viewer_file = std::fs::File::open(cluster.mount(holder).join("data")).expect("open");
    let viewer = Mapping::new_read_only(&viewer_file, (PAGES * 4096) as usize);
    // Closed at once (the mapping keeps the file): every process this test starts while the
    // holder is paused would otherwise close its copy of the descriptor at exec, and that
    // close waits for the paused holder's answer (FUSE flush), forever.
    drop(viewer_file);
    assert_eq!(viewer.page(1), vec![0u8; 4096]);

    // The holder stops answering; the owner restarts (PM kept) while the dispatcher counts
    // the holder as down, so its rejoin does not wait for it.
    let paused = cluster.pause(holder);
    cluster.wait_counted_down(owner, holder);
    cluster.kill(owner);
    cluster.start(owner);
    drop(paused);

    // Page 1 alone first: the commit goes to the holder only if the owner knows it holds it.
    mapping.bytes()[4096..8192].copy_from_slice(&page_pattern(2, 1));
    mapping
        .msync()
        .expect("the first commit of page 1, after the owner's restart");
    wait_until_reads(
        &cluster,
        (holder, holder),
        || viewer.page(1),
        (&[0u8; 4096], &page_pattern(2, 1)),
        &format!(
            "still shows zeros in page 1, read before anything wrote it and before its owner, \
             node {owner}, restarted, after the commit that first wrote it"
        ),
    );
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(2, 0));
    mapping
        .msync()
        .expect("a commit of page 0 after the owner's restart");
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
