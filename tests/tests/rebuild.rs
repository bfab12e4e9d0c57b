//! A node lost with its PM rebuilds the pages it owns from the other nodes' copies; a crash
//! in the middle of that rebuild must not make the next start take its half-empty PM as
//! whole (found by hotpot-sim: it served pages it never rebuilt as zeros).

use std::io::Read;
use std::time::Duration;

use hotpot_tests::{fuse_available, page_pattern, Cluster, Mapping};

const PAGES: u64 = 64;

#[test]
fn a_crash_in_the_middle_of_a_rebuild_is_followed_by_a_rebuild() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "64MiB");
    // 16 KiB chunks: every node owns pages; replicas 2: every page has a copy elsewhere.
    let path = cluster.create_chunked(1, "data", "256KiB", "mrsw", 2, "16KiB");
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open on node 1");
        let mut mapping = Mapping::new(&file, (PAGES * 4096) as usize);
        for page in 0..PAGES {
            let at = (page * 4096) as usize;
            mapping.bytes()[at..at + 4096].copy_from_slice(&page_pattern(1, page));
        }
        mapping.msync().expect("msync on node 1");
    }
    let owners = cluster.chunk_owners(&path);
    assert!(owners.contains(&2), "node 2 owns a chunk: {owners:?}");

    // Node 2 is lost with its PM, comes back, and dies as its rebuild starts.
    cluster.kill_and_wipe(2);
    let _ = cluster.try_start_with_env(2, &[("HOTPOT_FAULT", "node.rebuild_started")]);
    cluster.wait_crashed_at(2, "node.rebuild_started", Duration::from_secs(30));
    let marker = {
        let mut name = cluster.pm_file(2).into_os_string();
        name.push(".rebuilding");
        std::path::PathBuf::from(name)
    };
    assert!(marker.exists(), "the rebuild marker was not written");

    // Its PM file now exists and is formatted; the marker says it is not whole.
    cluster.start(2);
    let mut read = Vec::new();
    std::fs::File::open(cluster.mount(2).join("data"))
        .expect("open on node 2")
        .read_to_end(&mut read)
        .expect("read on node 2");
    for page in 0..PAGES {
        let at = (page * 4096) as usize;
        assert!(
            read[at..at + 4096] == page_pattern(1, page)[..],
            "page {page} (owner {}) reads wrong on node 2 after the interrupted rebuild",
            owners[(page / 4) as usize]
        );
    }
    assert!(!marker.exists(), "the marker outlived the rebuild");
}
