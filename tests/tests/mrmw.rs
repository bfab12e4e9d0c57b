//! MRMW on three nodes: byte merging of concurrent writers of one page, a conflict storm
//! with per-commit stamps, and all-or-nothing commits across three owners.

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Barrier};

use hotpot_tests::*;

const PAGES: u64 = 16;

#[test]
fn three_writers_of_disjoint_thirds_of_the_same_pages_all_keep_their_bytes() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "256MiB");
    cluster.create(1, "merged", "64KiB", "mrmw", 2);
    let third = 4096 / 3;
    let rounds = 200u32;
    let barrier = Arc::new(Barrier::new(3));
    std::thread::scope(|scope| {
        for node in 1..=3u32 {
            let file = std::fs::File::options()
                .read(true)
                .write(true)
                .open(cluster.mount(node).join("merged"))
                .unwrap();
            let barrier = barrier.clone();
            scope.spawn(move || {
                let mut map = Mapping::new(&file, (PAGES * 4096) as usize);
                for round in 1..=rounds {
                    for page in 0..PAGES as usize {
                        let start = page * 4096 + (node as usize - 1) * third;
                        map.bytes()[start..start + third].fill((round % 251) as u8 + node as u8);
                    }
                    barrier.wait();
                    map.msync()
                        .unwrap_or_else(|error| panic!("node {node} round {round}: msync {error}"));
                }
            });
        }
    });
    // Every node sees all three parts at the last round's values: through its kernel's
    // cache, and then from the node itself (the cache dropped). Wrong bytes in both are a
    // lost update, not a stale cache.
    let want: Vec<u8> = (1..=3)
        .map(|writer| (rounds % 251) as u8 + writer)
        .collect();
    let wrong = wrong_pages(&cluster, "merged", |page| {
        let thirds: Vec<Vec<u8>> = (0..3)
            .map(|writer| distinct(&page[writer * third..(writer + 1) * third]))
            .collect();
        let right = thirds
            .iter()
            .zip(&want)
            .all(|(seen, want)| *seen == [*want]);
        (!right).then(|| format!("{thirds:?}"))
    });
    assert!(
        wrong.is_empty(),
        "thirds not all at the last round's {want:?}:\n{}",
        wrong.join("\n")
    );
}

/// Every page of `name` at every node, read through the node's kernel cache and then with
/// that cache dropped (from the node itself: wrong bytes in both are a lost update, not a
/// stale cache): `check`'s complaints, each naming where it read.
fn wrong_pages(
    cluster: &Cluster,
    name: &str,
    check: impl Fn(&[u8]) -> Option<String>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for from_node in [false, true] {
        for reader in 1..=cluster.nodes {
            let file = std::fs::File::open(cluster.mount(reader).join(name)).unwrap();
            if from_node {
                drop_cached_pages(&file);
            }
            let mut page = vec![0u8; 4096];
            for index in 0..PAGES {
                file.read_exact_at(&mut page, index * 4096).unwrap();
                if let Some(complaint) = check(&page) {
                    let via = if from_node { "node" } else { "kernel cache" };
                    wrong.push(format!("node {reader} page {index} ({via}): {complaint}"));
                }
            }
        }
    }
    wrong
}

/// One byte per run of equal bytes in `part` (a uniform part gives one).
fn distinct(part: &[u8]) -> Vec<u8> {
    let mut seen = part.to_vec();
    seen.dedup();
    seen
}

/// One thread of each node's program stores without pause into the pages that other
/// writers' commits keep invalidating and its own commits keep rebasing, while another
/// thread of it commits its own part of every page in rounds; at the end the storing thread
/// msyncs too. Every acknowledged byte must stay: a store that faults a page in again while
/// the node is still forgetting the dropped copy's base, the kernel's write-back of a copy
/// older than the rebased staged page, or a page the kernel read again while its commit ran,
/// must not send other writers' older bytes. Each page is six parts: per node, one its
/// committing thread writes and one its storing thread writes.
#[test]
fn stores_racing_other_writers_commits_never_send_their_older_bytes() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "256MiB");
    cluster.create(1, "stores", "64KiB", "mrmw", 2);
    let part = 4096 / 6;
    let len = (PAGES * 4096) as usize;
    let rounds = 150u32;
    let fill = |map: &mut Mapping, index: usize, value: u8| {
        for page in 0..PAGES as usize {
            let start = page * 4096 + index * part;
            map.bytes()[start..start + part].fill(value);
        }
    };
    let barrier = Arc::new(Barrier::new(3));
    // Per node, the storing thread's last value, which its own msync committed.
    let stored: Vec<u8> = std::thread::scope(|scope| {
        let programs: Vec<_> = (1..=3u32)
            .map(|node| {
                let barrier = barrier.clone();
                let cluster = &cluster;
                scope.spawn(move || {
                    let committing = std::sync::atomic::AtomicBool::new(true);
                    std::thread::scope(|threads| {
                        let storing = threads.spawn(|| {
                            let mut map = Mapping::new(&cluster.open_rw(node, "stores"), len);
                            let mut value = 0u8;
                            while committing.load(std::sync::atomic::Ordering::Relaxed) {
                                value = value % 250 + 1;
                                fill(&mut map, 2 * node as usize - 1, value);
                                std::thread::yield_now();
                            }
                            map.msync().unwrap_or_else(|error| {
                                panic!("node {node}'s storing thread: msync {error}")
                            });
                            value
                        });
                        let mut map = Mapping::new(&cluster.open_rw(node, "stores"), len);
                        for round in 1..=rounds {
                            fill(&mut map, 2 * node as usize - 2, round as u8);
                            barrier.wait();
                            map.msync().unwrap_or_else(|error| {
                                panic!("node {node} round {round}: msync {error}")
                            });
                        }
                        committing.store(false, std::sync::atomic::Ordering::Relaxed);
                        storing.join().expect("storing thread")
                    })
                })
            })
            .collect();
        programs
            .into_iter()
            .map(|program| program.join().expect("program"))
            .collect()
    });
    let wrong = wrong_pages(&cluster, "stores", |page| {
        let parts: Vec<Vec<u8>> = (0..6)
            .map(|index| distinct(&page[index * part..(index + 1) * part]))
            .collect();
        let right = (0..3).all(|writer| {
            parts[2 * writer] == [rounds as u8] && parts[2 * writer + 1] == [stored[writer]]
        });
        (!right).then(|| format!("{parts:?}"))
    });
    assert!(
        wrong.is_empty(),
        "parts not all at round {rounds} (committing) and {stored:?} (storing):\n{}",
        wrong.join("\n")
    );
}

/// A commit stamp: (node, sequence) written at the start of every page of a commit.
fn stamp(node: u32, sequence: u32) -> [u8; 8] {
    (u64::from(node) << 32 | u64::from(sequence)).to_le_bytes()
}

#[test]
fn a_conflict_storm_loses_no_commit_and_applies_none_by_halves() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "256MiB");
    // One-page chunks: owners rotate page by page, so every commit spans several owners and
    // runs the three phases (lock in node-id order, merge, unlock) with refusals and retries.
    let path = cluster.create_chunked(1, "storm", "48KiB", "mrmw", 2, "4KiB");
    let owners = cluster.chunk_owners(&path).len();
    assert_eq!(owners, 12, "one owner entry per one-page chunk");
    let commits = 1000u32;
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for node in 1..=3u32 {
            let file = std::fs::File::options()
                .read(true)
                .write(true)
                .open(cluster.mount(node).join("storm"))
                .unwrap();
            let cluster = &cluster;
            scope.spawn(move || {
                let mut map = Mapping::new(&file, 48 << 10);
                for sequence in 1..=commits {
                    // Overlapping page sets: every node writes page 0 and two of the others,
                    // each in its own 8-byte slot so merged commits keep every node's stamp.
                    for page in [0usize, node as usize, (node as usize % 3) + 4] {
                        let at = page * 4096 + node as usize * 8;
                        map.bytes()[at..at + 8].copy_from_slice(&stamp(node, sequence));
                    }
                    map.msync().unwrap_or_else(|error| {
                        let log = cluster.node_log(node);
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        panic!(
                            "node {node} commit {sequence}: {error}; its log ends:\n{}",
                            tail.join("\n")
                        )
                    });
                }
            });
        }
    });
    let elapsed = started.elapsed();
    println!("{} commits from 3 nodes in {elapsed:?}", 3 * commits);
    // Quiescent: every node's last stamp is in every page it wrote, on every node.
    for reader in 1..=3u32 {
        let file = std::fs::File::open(cluster.mount(reader).join("storm")).unwrap();
        let mut slot = [0u8; 8];
        for node in 1..=3u32 {
            for page in [0u64, u64::from(node), u64::from(node % 3) + 4] {
                file.read_exact_at(&mut slot, page * 4096 + u64::from(node) * 8)
                    .unwrap();
                assert_eq!(
                    slot,
                    stamp(node, commits),
                    "node {reader} sees page {page} of writer {node}"
                );
            }
        }
    }
    assert!(
        elapsed < std::time::Duration::from_secs(240),
        "storm took {elapsed:?}"
    );
}

#[test]
fn a_commit_across_three_owners_is_all_or_nothing_for_later_readers() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(3, "256MiB");
    let path = cluster.create(1, "atomic", "12MiB", "mrmw", 2);
    let owners = cluster.chunk_owners(&path);
    assert_eq!(owners.len(), 3);
    let pages = [3u64, 1024 + 3, 2048 + 3]; // one per owner
    let writer = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut map = Mapping::new(&writer, 12 << 20);
    for round in 1..=500u32 {
        for page in pages {
            let at = page as usize * 4096;
            map.bytes()[at..at + 8].copy_from_slice(&stamp(1, round));
        }
        map.msync().expect("msync returns 0");
        let reader_node = 2 + round % 2;
        let reader = std::fs::File::open(cluster.mount(reader_node).join("atomic")).unwrap();
        let mut slot = [0u8; 8];
        for page in pages {
            reader.read_exact_at(&mut slot, page * 4096).unwrap();
            assert_eq!(
                slot,
                stamp(1, round),
                "round {round}: node {reader_node} page {page}"
            );
        }
    }
}
