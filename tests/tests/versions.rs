//! Published versions (issue 9, checks 1 and 2): a producer on node 1 commits 200 versions of
//! a 64 MiB dataset, each changing 1% of its pages; an observer on node 2 holds one version
//! open and reads all of it again and again (its kernel cache dropped each time, so every
//! pass reads from the owners): it never changes. Another on node 3 follows `@latest`,
//! reopening again and again: each open is one whole version, never a mix. PM kept for pinned
//! versions stays within changed pages × pinned versions and goes when the views close or
//! the viewing node dies.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hotpot_tests::*;
use rand::seq::IndexedRandom;
use rand::SeedableRng;

const SIZE: usize = 64 << 20;
const PAGES: usize = SIZE / 4096;
const ROUNDS: u64 = 200;
/// 1% of the pages per version.
const CHANGED_PER_ROUND: usize = PAGES / 100;

/// Every word of a page: the round that wrote it and the page.
fn word(round: u64, page: usize) -> u64 {
    (round << 32) | page as u64
}

fn stamp(bytes: &mut [u8], round: u64, page: usize) {
    let value = word(round, page).to_le_bytes();
    for chunk in bytes.chunks_exact_mut(8) {
        chunk.copy_from_slice(&value);
    }
}

/// The round that wrote each page of a whole dataset image; panics on a torn page.
fn rounds_in(image: &[u8], what: &str) -> Vec<u64> {
    image
        .chunks_exact(4096)
        .enumerate()
        .map(|(page, bytes)| {
            let first = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            assert_eq!(
                first & 0xFFFF_FFFF,
                page as u64,
                "{what}: page {page} holds another page"
            );
            assert!(
                bytes.chunks_exact(8).all(|w| w == first.to_le_bytes()),
                "{what}: page {page} is torn"
            );
            first >> 32
        })
        .collect()
}

/// Which round last wrote each page after round `round` (from the producer's history).
fn state_after(history: &[Vec<usize>], round: u64) -> Vec<u64> {
    let mut state = vec![0u64; PAGES];
    for (at, pages) in history.iter().enumerate().take(round as usize + 1) {
        for page in pages {
            state[*page] = at as u64;
        }
    }
    state
}

/// A view image must be exactly the dataset after one round: the newest round in it.
fn check_whole_version(image: &[u8], history: &[Vec<usize>], what: &str) -> u64 {
    let rounds = rounds_in(image, what);
    let round = *rounds.iter().max().unwrap();
    let expected = state_after(history, round);
    let mixed = rounds
        .iter()
        .zip(&expected)
        .position(|(got, want)| got != want);
    assert!(
        mixed.is_none(),
        "{what}: a mix of versions: page {} is from round {} but the version of round {round} has it from round {}",
        mixed.unwrap_or(0),
        rounds[mixed.unwrap_or(0)],
        expected[mixed.unwrap_or(0)]
    );
    round
}

fn read_all(file: &mut File) -> Vec<u8> {
    // Drop this node's cached pages of the view: the next read asks the owners again.
    drop_cached_pages(file);
    let mut image = Vec::with_capacity(SIZE);
    std::io::Seek::rewind(file).unwrap();
    file.read_to_end(&mut image).unwrap();
    assert_eq!(image.len(), SIZE);
    image
}

/// Per node: (views pinned, frames kept, PM frames used), from the heartbeats.
fn pin_usage(cluster: &Cluster) -> Vec<(u64, u64, u64)> {
    // Heartbeats come every 500 ms.
    std::thread::sleep(Duration::from_millis(1200));
    let status = cluster.status_json();
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["live"].as_bool() == Some(true))
        .map(|node| {
            let usage = &node["usage"];
            (
                usage["versions"]["views_pinned"].as_u64().unwrap(),
                usage["versions"]["frames_kept"].as_u64().unwrap(),
                usage["pm_frames_used"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn total(usage: &[(u64, u64, u64)], field: fn(&(u64, u64, u64)) -> u64) -> u64 {
    usage.iter().map(field).sum()
}

#[test]
fn views_see_exactly_their_version_while_the_producer_commits() {
    if !fuse_available() {
        return;
    }
    // No merging here: PM accounting is about pinned versions only.
    let cluster = Cluster::up_with(3, "512MiB", &[], &["--merge-pages-per-s", "0"]);
    let path = cluster.create_chunked(1, "data", "64MiB", "mrsw", 2, "4MiB");
    let file = File::options().read(true).write(true).open(&path).unwrap();
    let mut map = Mapping::new(&file, SIZE);
    // Round 0: every page.
    let started = Instant::now();
    for page in 0..PAGES {
        stamp(&mut map.bytes()[page * 4096..(page + 1) * 4096], 0, page);
    }
    map.msync().expect("msync of round 0");
    println!("round 0 (64 MiB) committed in {:?}", started.elapsed());
    let history: Mutex<Vec<Vec<usize>>> = Mutex::new(vec![(0..PAGES).collect()]);
    let baseline = pin_usage(&cluster);
    assert_eq!(total(&baseline, |u| u.1), 0, "nothing kept before any view");
    let versions_dir = |node: u32| cluster.mount(node).join(".versions");

    let done = AtomicBool::new(false);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let all_pages: Vec<usize> = (0..PAGES).collect();
    // Observer A's view, opened after round 10 and held to the end.
    let held: Mutex<Option<(File, u64)>> = Mutex::new(None);
    let (held_passes, latest_opens, mut msync_ms) = std::thread::scope(|scope| {
        let holder = scope.spawn(|| {
            let mut passes = 0u32;
            while !done.load(Ordering::Acquire) {
                let mut guard = held.lock().unwrap();
                let Some((file, round)) = guard.as_mut() else {
                    drop(guard);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let image = read_all(file);
                let history = history.lock().unwrap().clone();
                let seen = check_whole_version(&image, &history, "held view");
                assert_eq!(
                    seen, *round,
                    "the held view changed from round {round} to {seen}"
                );
                passes += 1;
            }
            passes
        });
        let follower = scope.spawn(|| {
            let mut opens = Vec::new();
            while !done.load(Ordering::Acquire) {
                let mut view = File::open(versions_dir(3).join("data@latest")).unwrap();
                let image = read_all(&mut view);
                let history = history.lock().unwrap().clone();
                opens.push(check_whole_version(&image, &history, "@latest view"));
            }
            opens
        });
        let mut msync_ms = Vec::new();
        for round in 1..=ROUNDS {
            let mut changed: Vec<usize> = all_pages
                .choose_multiple(&mut rng, CHANGED_PER_ROUND)
                .copied()
                .collect();
            changed.sort_unstable();
            history.lock().unwrap().push(changed.clone());
            for page in &changed {
                stamp(
                    &mut map.bytes()[page * 4096..(page + 1) * 4096],
                    round,
                    *page,
                );
            }
            let begun = Instant::now();
            map.msync().expect("producer msync");
            msync_ms.push(begun.elapsed().as_secs_f64() * 1e3);
            if round == 10 {
                let view = File::open(versions_dir(2).join("data@latest")).unwrap();
                *held.lock().unwrap() = Some((view, 10));
            }
        }
        done.store(true, Ordering::Release);
        let passes = holder.join().unwrap();
        let opens = follower.join().unwrap();
        (passes, opens, msync_ms)
    });
    msync_ms.sort_by(f64::total_cmp);
    println!(
        "{ROUNDS} versions of {CHANGED_PER_ROUND} pages: producer msync p50 {:.2} ms, p99 {:.2} ms; \
         held view read whole {held_passes} times; @latest opened {} times (rounds {:?}..{:?})",
        msync_ms[msync_ms.len() / 2],
        msync_ms[msync_ms.len() * 99 / 100],
        latest_opens.len(),
        latest_opens.first(),
        latest_opens.last()
    );
    assert!(
        held_passes >= 2,
        "the held view was read {held_passes} times"
    );
    let distinct: BTreeSet<u64> = latest_opens.iter().copied().collect();
    assert!(
        distinct.len() >= 2,
        "@latest saw only versions {distinct:?} while the producer committed"
    );

    // Check 2: PM for pinned versions. Pin three more versions, 20 rounds apart, while the
    // producer commits on; the kept frames are bounded by the pages changed after each pin.
    let mut views = vec![held.into_inner().unwrap().unwrap().0];
    let mut changed_after_pins = 0u64;
    let history = history.into_inner().unwrap();
    let mut round = ROUNDS;
    let mut pinned_rounds = vec![10u64];
    for _ in 0..3 {
        views.push(File::open(versions_dir(2).join("data@latest")).unwrap());
        pinned_rounds.push(round);
        for _ in 0..20 {
            round += 1;
            let changed: Vec<usize> = all_pages
                .choose_multiple(&mut rng, CHANGED_PER_ROUND)
                .copied()
                .collect();
            for page in &changed {
                stamp(
                    &mut map.bytes()[page * 4096..(page + 1) * 4096],
                    round,
                    *page,
                );
            }
            map.msync().expect("producer msync");
        }
    }
    // Each pinned version keeps at most the pages changed after it (each a kept frame at its
    // owner): the one of round 10 at most every page changed since.
    for pinned in &pinned_rounds {
        changed_after_pins += ((round - pinned) * CHANGED_PER_ROUND as u64).min(PAGES as u64);
    }
    // Only these views: an `@latest` lookup that no open followed (the kernel revalidating
    // a name that now resolves to a newer version) keeps its pin a few seconds more.
    let with_pins = wait_for_pins_of(&cluster, views.len() as u64, Duration::from_secs(12));
    let kept = total(&with_pins, |u| u.1);
    let grown = total(&with_pins, |u| u.2) as i64 - total(&baseline, |u| u.2) as i64;
    println!(
        "{} views pinned at each owner: {kept} frames kept ({} MiB), PM used grew by {grown} frames; bound {changed_after_pins}",
        views.len(),
        (kept * 4096) >> 20
    );
    assert!(kept > 0, "pinned versions kept nothing");
    assert!(
        kept <= changed_after_pins,
        "{kept} frames kept for {} pinned versions; at most {changed_after_pins} pages changed after them",
        views.len()
    );
    assert!(
        grown <= kept as i64 + 64,
        "PM used grew by {grown} frames, {kept} kept for views"
    );
    // The pinned versions are listed, open by number on another node, and read as the
    // version they pin; a version nobody pinned is gone (ESTALE); views are read-only.
    let stat = cluster.stat_json(&path);
    let pinned: Vec<u64> = stat["versions_pinned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let latest = stat["version"].as_u64().unwrap();
    // The four views, and perhaps an `@latest` lookup of the follower still in its grace.
    assert!(pinned.len() >= 4, "pinned versions in stat: {pinned:?}");
    let listed: BTreeSet<String> = std::fs::read_dir(versions_dir(1))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    // The four views: the oldest pinned (round 10's) and the three newest; an `@latest`
    // lookup pin of the follower may come and go in between.
    let ours = pinned[..1].iter().chain(&pinned[pinned.len() - 3..]);
    for version in ours.chain([&latest]) {
        assert!(
            listed.contains(&format!("data@{version}")),
            "readdir of .versions lacks data@{version}: {listed:?}"
        );
    }
    let mut by_number = File::open(versions_dir(1).join(format!("data@{}", pinned[0]))).unwrap();
    let oldest = check_whole_version(&read_all(&mut by_number), &history, "view by number");
    assert_eq!(oldest, 10, "the oldest pinned version is round 10's");
    let unpinned = (pinned[0] + 1..)
        .find(|version| !pinned.contains(version))
        .unwrap();
    let gone = File::open(versions_dir(3).join(format!("data@{unpinned}")))
        .and_then(|mut view| view.read(&mut [0u8; 8]));
    assert_eq!(
        gone.err().and_then(|error| error.raw_os_error()),
        Some(libc::ESTALE),
        "version {unpinned} was pinned by nobody"
    );
    let write = File::options()
        .write(true)
        .open(versions_dir(2).join(format!("data@{latest}")));
    assert_eq!(
        write.err().and_then(|error| error.raw_os_error()),
        Some(libc::EROFS)
    );
    drop(by_number);
    // Closing every view gives it all back (an `@latest` lookup that no open followed keeps
    // its pin for a few seconds more, hence the wait).
    drop(views);
    let closed = wait_for_no_pins(&cluster, Duration::from_secs(12));
    let after = total(&closed, |u| u.2) as i64 - total(&baseline, |u| u.2) as i64;
    assert!(
        after.abs() <= 64,
        "PM used is {after} frames off its baseline after the views closed"
    );

    // A viewing node that dies releases its pins (they are leases).
    let mut dying_view = File::open(versions_dir(3).join("data@latest")).unwrap();
    let _ = read_all(&mut dying_view);
    round += 1;
    for page in 0..CHANGED_PER_ROUND {
        stamp(
            &mut map.bytes()[page * 4096..(page + 1) * 4096],
            round,
            page,
        );
    }
    map.msync().expect("producer msync");
    assert!(
        total(&pin_usage(&cluster), |u| u.1) > 0,
        "node 3's view kept nothing"
    );
    std::mem::forget(dying_view); // its node dies under it
    cluster.kill(3);
    wait_for_no_pins(&cluster, Duration::from_secs(25));
}

/// Wait until every live node pins exactly `views` views (every node owns part of the dataset).
fn wait_for_pins_of(cluster: &Cluster, views: u64, within: Duration) -> Vec<(u64, u64, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let usage = pin_usage(cluster);
        if usage.iter().all(|u| u.0 == views) {
            return usage;
        }
        assert!(
            Instant::now() < deadline,
            "not exactly {views} views pinned at every owner after {within:?}: {usage:?}"
        );
    }
}

/// Wait until no live node pins a view or keeps a frame for one.
fn wait_for_no_pins(cluster: &Cluster, within: Duration) -> Vec<(u64, u64, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let usage = pin_usage(cluster);
        if total(&usage, |u| u.0) == 0 && total(&usage, |u| u.1) == 0 {
            return usage;
        }
        assert!(
            Instant::now() < deadline,
            "views still pinned or frames kept after {within:?}: {usage:?}"
        );
    }
}

/// MRMW: two writers on nodes 1 and 2 commit their own halves of a dataset whose chunks are
/// spread over three owners (versions from the dataset's home); every view opened on node 3
/// shows each writer's commit whole (all of its pages from one round), and a held view never
/// changes.
#[test]
fn views_of_a_multi_writer_dataset_show_whole_commits() {
    if !fuse_available() {
        return;
    }
    const HALF: usize = 16;
    const MRMW_ROUNDS: u64 = 60;
    let cluster = Cluster::up_with(3, "256MiB", &[], &["--merge-pages-per-s", "0"]);
    let path = cluster.create_chunked(1, "shared", "128KiB", "mrmw", 2, "16KiB");
    assert!(
        cluster
            .chunk_owners(&path)
            .iter()
            .collect::<BTreeSet<_>>()
            .len()
            == 3,
        "the pages should have three owners"
    );
    let writer = |node: u32, first: usize| {
        let cluster = &cluster;
        move || {
            let file = File::options()
                .read(true)
                .write(true)
                .open(cluster.mount(node).join("shared"))
                .unwrap();
            let mut map = Mapping::new(&file, 2 * HALF * 4096);
            for round in 1..=MRMW_ROUNDS {
                for page in first..first + HALF {
                    stamp(
                        &mut map.bytes()[page * 4096..(page + 1) * 4096],
                        round,
                        page,
                    );
                }
                map.msync().expect("MRMW msync");
            }
        }
    };
    // The round of each half of a view; panics if a half mixes rounds or a page is torn.
    let halves = |image: &[u8], what: &str| -> (u64, u64) {
        let rounds: Vec<u64> = image
            .chunks_exact(4096)
            .enumerate()
            .map(|(page, bytes)| {
                let first = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                assert!(
                    bytes.chunks_exact(8).all(|w| w == first.to_le_bytes()),
                    "{what}: page {page} is torn"
                );
                assert!(
                    first == 0 || first & 0xFFFF_FFFF == page as u64,
                    "{what}: page {page} holds another page"
                );
                first >> 32
            })
            .collect();
        for half in rounds.chunks(HALF) {
            assert!(
                half.iter().all(|round| *round == half[0]),
                "{what}: one writer's commit is split: {half:?}"
            );
        }
        (rounds[0], rounds[HALF])
    };
    let views_dir = cluster.mount(3).join(".versions");
    let mut held: Option<(File, (u64, u64))> = None;
    let mut opens = 0u32;
    std::thread::scope(|scope| {
        let first = scope.spawn(writer(1, 0));
        let second = scope.spawn(writer(2, HALF));
        while !(first.is_finished() && second.is_finished()) {
            let mut view = File::open(views_dir.join("shared@latest")).unwrap();
            let mut image = Vec::new();
            view.read_to_end(&mut image).unwrap();
            let seen = halves(&image, "@latest view");
            opens += 1;
            match held.as_mut() {
                None => held = Some((view, seen)),
                Some((file, rounds)) => {
                    drop_cached_pages(file);
                    let mut again = Vec::new();
                    std::io::Seek::rewind(file).unwrap();
                    file.read_to_end(&mut again).unwrap();
                    assert_eq!(
                        halves(&again, "held view"),
                        *rounds,
                        "the held view changed"
                    );
                }
            }
        }
        first.join().unwrap();
        second.join().unwrap();
    });
    let mut last = Vec::new();
    File::open(views_dir.join("shared@latest"))
        .unwrap()
        .read_to_end(&mut last)
        .unwrap();
    assert_eq!(halves(&last, "final view"), (MRMW_ROUNDS, MRMW_ROUNDS));
    println!("MRMW: {opens} views opened during {MRMW_ROUNDS} rounds of two writers, all whole");
}
