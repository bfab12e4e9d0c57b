//! A holder's copies of one commit across owners, one per owner's part, all waiting (their
//! Decides lost), are settled together by the leader's outcome. A later commit of a page of
//! one part was decided here meanwhile, so that part's copy is dropped whole (never
//! backwards), and this node's copies of its other pages stay older than what their owner
//! counts. The resolver registered only the copy it asked about (the leader's part) with its
//! owner; the dropped part's pages were read old for good. Now a copy dropped at its
//! decision drops the kernel's copies and reads its pages from their owner until it
//! confirms this node's copies (as the node machine registers them).

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use hotpot_tests::{fuse_available, page_pattern, Cluster, Mapping};

const PAGES: u64 = 16;
const PAGE: usize = 4096;
/// Chunks of four pages.
const CHUNK_PAGES: u64 = 4;

fn page_at(file: &std::fs::File, page: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; PAGE];
    file.read_exact_at(&mut bytes, page * PAGE as u64)
        .expect("read a page");
    bytes
}

fn write_pages(mapping: &mut Mapping, pages: &[u64], stamp: u64) {
    for page in pages {
        let at = *page as usize * PAGE;
        mapping.bytes()[at..at + PAGE].copy_from_slice(&page_pattern(stamp, *page));
    }
}

#[test]
fn a_copy_dropped_at_its_late_decision_is_not_read_old() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(4, "64MiB");
    cluster.wait_views_settled();
    let path = cluster.create_chunked(1, "data", "64KiB", "mrmw", 2, "16KiB");
    let owners: Vec<u32> = cluster
        .chunk_owners(&path)
        .iter()
        .map(|owner| *owner as u32)
        .collect();
    assert_ne!(
        owners[0], owners[1],
        "chunks 0 and 1 have different owners: {owners:?}"
    );
    // The leader of a commit across owners is the lowest-id owner; the follower's part is
    // the one whose copy is dropped.
    let (leader_chunk, follower_chunk) = if owners[0] < owners[1] {
        (0, 1)
    } else {
        (1, 0)
    };
    let leader_page = leader_chunk * CHUNK_PAGES;
    let (newer, behind) = (
        follower_chunk * CHUNK_PAGES,
        follower_chunk * CHUNK_PAGES + 1,
    );
    let mut others = (1..=4).filter(|node| !owners[..2].contains(node));
    let (writer, holder) = (others.next().unwrap(), others.next().unwrap());
    let pages = [leader_page, newer, behind];

    let file = cluster.open_rw(writer, "data");
    let mut mapping = Mapping::new(&file, PAGES as usize * PAGE);
    write_pages(&mut mapping, &pages, 1);
    mapping.msync().expect("the first commit");
    // The holder reads the three pages: its kernel caches them, and it is a target of both
    // owners' parts of the next commit.
    let held = cluster.open_rw(holder, "data");
    for page in pages {
        assert_eq!(page_at(&held, page), page_pattern(1, page));
    }

    // A commit across both owners whose Decides to the holder are lost: its two copies wait
    // prepared for the leader's outcome.
    cluster.arm_fault(holder, "drop:target.deciding");
    write_pages(&mut mapping, &pages, 2);
    mapping
        .msync()
        .expect("acknowledged: the owners and the writer hold it");
    cluster.arm_fault(holder, "none");
    // At once, one page of the follower's part again: decided at the holder, newer than the
    // copy waiting there.
    write_pages(&mut mapping, &[newer], 3);
    mapping.msync().expect("the third commit");

    // The holder settles both copies with the leader (after 2 s): decided, but the
    // follower's part is dropped whole (page `newer` is newer here). Read before, the page
    // would come from its owner (a page with a newer copy prepared here is read there).
    std::thread::sleep(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = page_at(&held, behind);
        if page == page_pattern(2, behind) {
            break;
        }
        assert_eq!(
            page,
            page_pattern(1, behind),
            "node {holder} reads bytes no commit wrote"
        );
        assert!(
            Instant::now() < deadline,
            "node {holder} still reads page {behind} as before the acknowledged commit across \
             owners, 25 s after it (its copy of that part was dropped at its decision)\nits \
             log: {}",
            cluster.node_log(holder)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(page_at(&held, newer), page_pattern(3, newer));
    assert_eq!(page_at(&held, leader_page), page_pattern(2, leader_page));
}
