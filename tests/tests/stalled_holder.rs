//! A holder the dispatcher counts as down is left out of a commit (the commit does not wait
//! for it), so its copy falls behind. Found by hotpot-sim once the node machine took the
//! dispatcher's view: such a holder kept its old copy for good when it was in fact alive
//! (a stalled process, or cut off from the dispatcher only). The owner now remembers it as
//! behind and sends it the page once it is live again.

use std::time::{Duration, Instant};

use hotpot_tests::{fuse_available, page_pattern, wait_until_reads, Cluster, Mapping};

const PAGES: u64 = 16;

#[test]
fn a_holder_left_out_while_it_was_silent_catches_up_when_it_is_back() {
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

    // The holder stops answering; wait until the owner counts it as down.
    let paused = cluster.pause(holder);
    cluster.wait_counted_down(owner, holder);
    let started = Instant::now();
    mapping.bytes()[..4096].copy_from_slice(&page_pattern(2, 0));
    mapping
        .msync()
        .expect("a commit with a silent holder left out");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the commit waited for the silent holder ({:?})",
        started.elapsed()
    );

    // Back: it must not keep the page it had.
    drop(paused);
    wait_until_reads(
        &cluster,
        (holder, owner),
        || cluster.first_page(holder, "data"),
        (&page_pattern(1, 0), &page_pattern(2, 0)),
        "still reads the page as it was before it went silent, after it came back",
    );
    let stat = cluster.stat_json(&path);
    assert!(
        stat["min_copies"].as_u64().unwrap_or(0) >= 2,
        "pages below two copies: {stat}"
    );
}
