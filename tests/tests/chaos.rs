//! Chaos (issue: recovery, check 3): three nodes, replicas 2, an MRMW dataset; a writer
//! process per node commits stamped pages (every commit spans the three owners) while a
//! chaos loop kills a random node every few seconds, never two at once, and restarts it —
//! usually on its PM file, one time in four on a new one (the node lost). At the end every
//! acknowledged commit must be found on every node, reported as "N commits acknowledged,
//! N found". HOTPOT_CHAOS_SECS sets the chaos time (default 90, at most 600).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hotpot_tests::writer::{stamps, write_commits, Outcome};
use hotpot_tests::{fuse_available, require_program, Cluster};
use rand::{Rng, SeedableRng};

const PAGES: u64 = 3 * 1024;
/// Each writer cycles over this many commits' worth of its own pages.
const RING: u64 = 16;
const NAME: &str = "chaos";

/// Pages of writer `node`'s commit `seq`: three consecutive pages (three owners, 4 KiB
/// chunks) in its own third of the file.
fn pages_of(node: u32, seq: u64) -> Vec<u64> {
    let base = (node as u64 - 1) * (PAGES / 3) + 3 * (seq % RING);
    vec![base, base + 1, base + 2]
}

/// Commit ids carry their writer: node * 10^12 + seq.
fn commit_id(node: u32, seq: u64) -> u64 {
    node as u64 * 1_000_000_000_000 + seq
}

/// The writer threads, stopped and joined however the test ends: on a failure they let go of
/// the cluster, so its drop stops every process.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    /// Stop the writers; whether each ended without a panic.
    fn stop_and_join(&mut self) -> Vec<bool> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .drain(..)
            .map(|writer| writer.join().is_ok())
            .collect()
    }

    fn finish(mut self) {
        assert!(
            self.stop_and_join().iter().all(|ok| *ok),
            "a writer thread panicked"
        );
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[test]
fn random_kills_and_restarts_lose_no_acknowledged_commit() {
    if !fuse_available() {
        return;
    }
    require_program("python3", "apt-get install python3");
    let secs: u64 = std::env::var("HOTPOT_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90)
        .min(600);
    // HOTPOT_CHAOS_SEED=<seed>: the same kills and wipes again (their timing still varies).
    let seed: u64 = std::env::var("HOTPOT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("chaos seed {seed}, {secs} s");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cluster = Arc::new(Cluster::up_with_env(
        3,
        "256MiB",
        &[("HOTPOT_RESOLVE_AFTER_MS", "300")],
    ));
    let path = cluster.create_chunked(1, NAME, &format!("{}KiB", PAGES * 4), "mrmw", 2, "4KiB");
    drop(path);
    let stop = Arc::new(AtomicBool::new(false));
    // Per writer: seq -> outcome, and whether its node is up (the chaos loop says).
    let outcomes: Arc<Mutex<BTreeMap<u32, BTreeMap<u64, Outcome>>>> = Arc::default();
    let down: Arc<Mutex<Option<u32>>> = Arc::default();
    let writers = Writers {
        stop: stop.clone(),
        threads: (1..=3u32)
            .map(|node| {
                let (cluster, stop, outcomes, down) = (
                    cluster.clone(),
                    stop.clone(),
                    outcomes.clone(),
                    down.clone(),
                );
                std::thread::spawn(move || {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if *down.lock().unwrap() == Some(node) {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                        let plan: Vec<(u64, Vec<u64>)> = (seq..seq + 20)
                            .map(|s| (commit_id(node, s), pages_of(node, s)))
                            .collect();
                        seq += 20;
                        let said =
                            write_commits(&cluster.mount(node).join(NAME), PAGES * 4096, &plan);
                        let mut all = outcomes.lock().unwrap();
                        let mine = all.entry(node).or_default();
                        for (id, outcome) in said {
                            mine.insert(id % 1_000_000_000_000, outcome);
                        }
                    }
                })
            })
            .collect(),
    };
    let started = Instant::now();
    let (mut kills, mut wipes) = (0, 0);
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..3500)));
        let victim = rng.random_range(1..=3u32);
        let wipe = rng.random_range(0..4) == 0;
        *down.lock().unwrap() = Some(victim);
        cluster.kill(victim);
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1000)));
        if wipe {
            std::fs::remove_file(cluster.pm_file(victim)).expect("delete the PM file");
            wipes += 1;
        }
        if let Err(why) = cluster.try_start(victim) {
            panic!("seed {seed}: {why}\n{}", cluster.node_log(victim));
        }
        *down.lock().unwrap() = None;
        if wipe {
            // The next kill may take another copy: wait until every page has two again.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let stat = cluster.stat_json(&cluster.mount(1).join(NAME));
                if stat["min_copies"].as_u64().unwrap_or(0) >= 2 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "seed {seed}: pages stayed below two copies after node {victim} was lost: {stat}"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    writers.finish();
    // Every acknowledged commit is found: each of its pages holds it or a later commit of
    // the same writer (the pages are reused).
    let outcomes = outcomes.lock().unwrap().clone();
    let acknowledged = outcomes
        .values()
        .flat_map(|mine| mine.values())
        .filter(|outcome| **outcome == Outcome::Acked)
        .count() as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let found = loop {
        let mut found = 0u64;
        let mut missing = Vec::new();
        for node in 1..=3u32 {
            for reader in 1..=3u32 {
                let mine = &outcomes[&node];
                let pages: Vec<u64> = (0..RING).flat_map(|slot| pages_of(node, slot)).collect();
                let stamps = match stamps(&cluster.mount(reader).join(NAME), &pages) {
                    Ok(stamps) => stamps,
                    Err(why) => {
                        missing.push(format!("node {reader}: {why}"));
                        continue;
                    }
                };
                for (seq, outcome) in mine {
                    if *outcome != Outcome::Acked {
                        continue;
                    }
                    let id = commit_id(node, *seq);
                    let here = pages_of(node, *seq).iter().all(|page| {
                        let (stamp, on) = stamps[page];
                        on == *page && stamp >= id && stamp / 1_000_000_000_000 == node as u64
                    });
                    if here {
                        if reader == 1 {
                            found += 1;
                        }
                    } else {
                        missing.push(format!("commit {id} on node {reader}"));
                    }
                }
            }
        }
        if missing.is_empty() {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {} acknowledged commits not found, e.g. {:?} (logs kept in {})",
            missing.len(),
            &missing[..missing.len().min(10)],
            cluster
                .keep_logs(&format!("hotpot-chaos-failure-{seed}"))
                .display()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "chaos: {secs} s, {kills} kills ({wipes} with the PM file deleted): \
         {acknowledged} commits acknowledged, {found} found"
    );
    assert_eq!(acknowledged, found);
    assert!(
        acknowledged > 0,
        "seed {seed}: no commit was acknowledged at all"
    );
}
