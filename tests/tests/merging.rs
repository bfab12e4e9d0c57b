//! Identical-page merging (issue 9, check 3): twenty datasets with the same 32 MiB on one node
//! end up in about one copy's worth of PM; writing one page of one of them changes only that
//! dataset; after kill -9 and a restart every byte is still right and the sharing stays.

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hotpot_tests::*;

const DATASETS: usize = 20;
const SIZE: usize = 32 << 20;
const PAGES: usize = SIZE / 4096;

/// The same contents in every dataset: a distinct page at each index.
fn contents() -> Vec<u8> {
    (0..PAGES as u64)
        .flat_map(|page| page_pattern(7, page))
        .collect()
}

/// (PM frames used, frames shared, bytes saved) of node 1, from its heartbeat.
fn usage(cluster: &Cluster) -> (u64, u64, u64) {
    std::thread::sleep(Duration::from_millis(1200));
    let status = cluster.status_json();
    let node = &status["nodes"][0]["usage"];
    (
        node["pm_frames_used"].as_u64().unwrap(),
        node["sharing"]["frames_shared"].as_u64().unwrap(),
        node["sharing"]["bytes_saved"].as_u64().unwrap(),
    )
}

fn read(path: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SIZE);
    File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
    bytes
}

/// Wait until node 1's usage (frames used, frames shared, bytes saved) satisfies `done`;
/// returns it then.
fn wait_for(
    cluster: &Cluster,
    within: Duration,
    what: &str,
    done: impl Fn(&(u64, u64, u64)) -> bool,
) -> (u64, u64, u64) {
    let deadline = Instant::now() + within;
    loop {
        let now = usage(cluster);
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 after {within:?}: {what} not reached; frames used {}, shared {}, bytes saved {}",
            now.0,
            now.1,
            now.2
        );
    }
}

#[test]
fn identical_datasets_share_frames_and_stay_right_across_a_crash() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up_with(
        1,
        "1GiB",
        &[],
        &["--replicas", "1", "--merge-pages-per-s", "200000"],
    );
    let image = contents();
    let paths: Vec<_> = (0..DATASETS)
        .map(|index| cluster.create(1, &format!("copy{index}"), "32MiB", "mrsw", 1))
        .collect();
    let started = Instant::now();
    for path in &paths {
        let mut file = File::options().write(true).open(path).unwrap();
        file.write_all(&image).unwrap();
        file.sync_all().expect("fsync commits");
    }
    println!("{DATASETS} x 32 MiB written in {:?}", started.elapsed());
    let one_copy = PAGES as u64;
    let bound = one_copy * 12 / 10;
    let merging = Instant::now();
    let (used, _, _) = wait_for(&cluster, Duration::from_secs(60), "PM bound", |now| {
        now.0 <= bound
    });
    let merged_in = merging.elapsed();
    // `status` counts the sharing at the end of each merger round.
    let saved_at_least = (DATASETS as u64 - 2) * SIZE as u64;
    let (_, shared, saved) = wait_for(&cluster, Duration::from_secs(15), "sharing shown", |now| {
        now.2 >= saved_at_least
    });
    println!(
        "merged within {merged_in:?}: PM used {used} frames for {DATASETS} x {one_copy} pages ({:.2}x one copy); \
         {shared} frames shared, {} MiB saved",
        used as f64 / one_copy as f64,
        saved >> 20
    );
    assert!(shared >= one_copy - 16, "only {shared} frames shared");

    // Writing one page of one dataset copies it first: only that dataset changes.
    let changed = 5;
    let page = 1000;
    {
        let file = File::options()
            .read(true)
            .write(true)
            .open(&paths[changed])
            .unwrap();
        let mut map = Mapping::new(&file, SIZE);
        map.bytes()[page * 4096..(page + 1) * 4096].copy_from_slice(&page_pattern(8, page as u64));
        map.msync().expect("msync");
    }
    let mut expected_changed = image.clone();
    expected_changed[page * 4096..(page + 1) * 4096].copy_from_slice(&page_pattern(8, page as u64));
    let check_all = |when: &str| {
        for (index, path) in paths.iter().enumerate() {
            let want = if index == changed {
                &expected_changed
            } else {
                &image
            };
            let got = read(path);
            let wrong = got
                .chunks_exact(4096)
                .zip(want.chunks_exact(4096))
                .position(|(got, want)| got != want);
            assert!(
                wrong.is_none(),
                "{when}: dataset copy{index} page {} is wrong",
                wrong.unwrap_or(0)
            );
        }
    };
    check_all("after writing one shared page");

    // kill -9 and restart: every slot comes back, still sharing.
    cluster.kill(1);
    cluster.start(1);
    check_all("after kill -9 and restart");
    let (used, shared, _) = wait_for(&cluster, Duration::from_secs(30), "PM bound", |now| {
        now.0 <= bound + 1
    });
    println!("after the restart: PM used {used} frames, {shared} frames shared");
}
