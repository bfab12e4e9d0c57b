//! Pages read by nodes that do not own them while the owner commits without pause: every page
//! read is one whole committed version, never a mix (issue 7, check 3). With
//! `HOTPOT_TEST_TRANSPORT=verbs` (the rxe guest of `.ci/run`) those reads are one-sided RDMA
//! READs of the owner's PM frames, and the test checks that they were; over TCP it checks the
//! same property of two-sided fetches.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use hotpot_tests::*;
use rand::{Rng, SeedableRng};

const SIZE: usize = 4 << 20;
const PAGES: u64 = (SIZE / 4096) as u64;
const PAGES_PER_COMMIT: usize = 32;

/// Word 0: the round that wrote the page; word 1: the page; the rest from both.
fn stamped(round: u64, page: u64) -> Vec<u8> {
    let mut bytes = page_pattern(round, page);
    bytes[..8].copy_from_slice(&round.to_le_bytes());
    bytes[8..16].copy_from_slice(&page.to_le_bytes());
    bytes
}

/// The round of a whole, committed-by-someone page; panics on a torn or foreign one.
fn check(page: u64, bytes: &[u8], node: u32) -> u64 {
    let round = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert!(
        bytes == stamped(round, page).as_slice(),
        "node {node}: page {page} is not one whole version (header says round {round})"
    );
    round
}

#[test]
fn pages_read_during_a_commit_storm_are_whole_committed_versions() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "256MiB");
    let path = cluster.create_chunked(1, "storm", "4MiB", "mrsw", 1, "4MiB");
    let owner = cluster.chunk_owners(&path)[0] as u32;
    let readers: Vec<u32> = (1..=3).filter(|node| *node != owner).collect();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(cluster.mount(owner).join("storm"))
        .unwrap();
    let mut map = Mapping::new(&file, SIZE);
    // Round 1 writes every page, so the owner has a persisted copy of each to read.
    for page in 0..PAGES {
        let at = page as usize * 4096;
        map.bytes()[at..at + 4096].copy_from_slice(&stamped(1, page));
    }
    map.msync().expect("msync returns 0");
    let committed = AtomicU64::new(1);
    // Per page, the last round whose msync returned: a later read shows it or a newer one.
    let acknowledged: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(1)).collect();
    let (rounds, reads) = std::thread::scope(|scope| {
        let reading: Vec<_> = readers
            .iter()
            .map(|&node| {
                let (cluster, committed, acknowledged) = (&cluster, &committed, &acknowledged);
                scope.spawn(move || {
                    let file = std::fs::File::open(cluster.mount(node).join("storm")).unwrap();
                    let mut bytes = vec![0u8; 4096];
                    for page in 0..PAGES {
                        let at_least = acknowledged[page as usize].load(Ordering::Acquire);
                        file.read_exact_at(&mut bytes, page * 4096).unwrap();
                        let round = check(page, &bytes, node);
                        let begun = committed.load(Ordering::Acquire);
                        assert!(
                            round <= begun,
                            "node {node}: page {page} from round {round}, only {begun} begun"
                        );
                        assert!(
                            round >= at_least,
                            "node {node}: page {page} from round {round}, {at_least} was acknowledged before the read"
                        );
                    }
                    PAGES
                })
            })
            .collect();
        // The writer (this thread: the mapping stays on it) commits until both readers are done.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut round = 1;
        while !reading.iter().all(|reader| reader.is_finished()) {
            round += 1;
            let pages: Vec<u64> = (0..PAGES_PER_COMMIT)
                .map(|_| rng.random_range(0..PAGES))
                .collect();
            for &page in &pages {
                let at = page as usize * 4096;
                map.bytes()[at..at + 4096].copy_from_slice(&stamped(round, page));
            }
            committed.store(round, Ordering::Release);
            map.msync().expect("msync returns 0");
            for &page in &pages {
                acknowledged[page as usize].store(round, Ordering::Release);
            }
        }
        let reads: u64 = reading
            .into_iter()
            .map(|reader| reader.join().unwrap())
            .sum();
        (round, reads)
    });
    let status = cluster.status_json();
    let fetches: Vec<serde_json::Value> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| readers.contains(&(node["id"].as_u64().unwrap() as u32)))
        .map(|node| node["usage"]["fetches"].clone())
        .collect();
    println!("{reads} page reads during {rounds} commits of {PAGES_PER_COMMIT} pages; readers' fetches: {fetches:?}");
    assert!(
        rounds >= 2,
        "the storm overlapped the reads ({rounds} commits)"
    );
    let count = |what: &str| -> u64 {
        fetches
            .iter()
            .map(|counts| counts[what].as_u64().unwrap())
            .sum()
    };
    let one_sided = count("one_sided");
    if expected_transport() == "verbs" {
        assert!(
            one_sided > count("two_sided"),
            "most fetches were one-sided: {fetches:?}"
        );
    } else {
        assert_eq!(one_sided, 0, "TCP has no one-sided reads: {fetches:?}");
    }
}
