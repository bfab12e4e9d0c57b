//! A real program's view of one node: mmap, msync, crash, restart (issue checks 1, 2, 6).

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::process::Command;

use hotpot_tests::*;
use rand::{Rng, SeedableRng};

const SIZE: usize = 64 << 20;
const PAGES: u64 = (SIZE / 4096) as u64;

fn random_pages(seed: u64, count: usize) -> BTreeSet<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pages = BTreeSet::new();
    while pages.len() < count {
        pages.insert(rng.random_range(0..PAGES));
    }
    pages
}

fn expected(page: u64, committed: &BTreeSet<u64>, stamp: u64) -> Vec<u8> {
    if committed.contains(&page) {
        page_pattern(stamp, page)
    } else {
        vec![0u8; 4096]
    }
}

#[test]
fn msync_commits_1000_random_pages_seen_by_a_fresh_mapping_and_pread() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(1, "256MiB");
    let path = cluster.mount(1).join("data");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(SIZE as u64).unwrap();
    let pages = random_pages(1, 1000);
    {
        let mut map = Mapping::new(&file, SIZE);
        for &page in &pages {
            let at = page as usize * 4096;
            map.bytes()[at..at + 4096].copy_from_slice(&page_pattern(7, page));
        }
        map.msync().expect("msync returns 0");
    }
    let reopened = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut fresh = Mapping::new(&reopened, SIZE);
    let mut buffer = vec![0u8; 4096];
    for page in 0..PAGES {
        let want = expected(page, &pages, 7);
        let at = page as usize * 4096;
        assert!(
            fresh.bytes()[at..at + 4096] == want[..],
            "page {page} differs through a fresh mapping"
        );
        reopened.read_exact_at(&mut buffer, at as u64).unwrap();
        assert!(buffer == want, "page {page} differs through pread");
    }
    let stat = cluster.hotpot(&["stat", "--json", path.to_str().unwrap()]);
    let stat: serde_json::Value = serde_json::from_str(&stat).unwrap();
    assert_eq!(
        stat["pages_committed"], 1000,
        "exactly the written pages are committed"
    );
}

#[test]
fn committed_bytes_survive_kill_9_and_uncommitted_ones_do_not() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(1, "256MiB");
    let path = cluster.mount(1).join("crash");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len(SIZE as u64).unwrap();
    let committed = random_pages(2, 500);
    let uncommitted = random_pages(3, 300);
    let mut map = Mapping::new(&file, SIZE);
    for &page in &committed {
        let at = page as usize * 4096;
        map.bytes()[at..at + 4096].copy_from_slice(&page_pattern(1, page));
    }
    map.msync().expect("msync returns 0");
    // Written, never msynced; some may reach the node through writeback (staged only).
    for &page in &uncommitted {
        let at = page as usize * 4096;
        map.bytes()[at..at + 4096].copy_from_slice(&page_pattern(2, page));
    }
    // Push part of them to the node without a commit: MS_ASYNC starts writeback only.
    // SAFETY: our own mapping.
    unsafe { libc::msync(map.ptr as *mut libc::c_void, SIZE / 2, libc::MS_ASYNC) };
    cluster.kill(1);
    drop(map);
    drop(file);
    cluster.start(1);
    let file = std::fs::File::open(&path).unwrap();
    let mut buffer = vec![0u8; 4096];
    for page in 0..PAGES {
        file.read_exact_at(&mut buffer, page * 4096).unwrap();
        let want = expected(page, &committed, 1);
        assert!(
            buffer == want,
            "page {page} after restart: committed {}, written but not committed {}; \
             found {}",
            committed.contains(&page),
            uncommitted.contains(&page),
            describe(&buffer)
        );
    }
}

/// Which stamp a page carries (pattern stamps 1 and 2), or zeros, for failure messages.
fn describe(bytes: &[u8]) -> String {
    if bytes.iter().all(|byte| *byte == 0) {
        return "zeros".into();
    }
    for stamp in [1, 2] {
        for page in 0..PAGES {
            if bytes[..8] == page_pattern(stamp, page)[..8] {
                return format!("stamp {stamp} of page {page}");
            }
        }
    }
    "unknown bytes".into()
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    if !fuse_available() {
        return;
    }
    let cluster = Cluster::up(1, "64MiB");
    let mount = cluster.mount(1);

    // Names over 255 bytes: ENAMETOOLONG, for create and lookup alike.
    let long = mount.join("n".repeat(256));
    let error = std::fs::File::create(&long).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENAMETOOLONG), "{error}");
    let error = std::fs::metadata(&long).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENAMETOOLONG), "{error}");
    std::fs::File::create(mount.join("n".repeat(255))).expect("255 bytes is fine");

    let spare = tempfile::tempdir().unwrap();
    let node = |pm: &std::path::Path, id: &str| {
        run(Command::new(hotpot_bin())
            .args([
                "node",
                "--id",
                id,
                "--dispatcher",
                &cluster.dispatcher_addr(),
                "--pm",
            ])
            .arg(pm)
            .arg("--mount")
            .arg(spare.path()))
    };

    // A second node on a PM file in use.
    let output = node(&cluster.pm_file(1), "1");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");

    // A foreign file: refused, not a byte changed.
    let foreign = spare.path().join("foreign.pm");
    let content: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&foreign, &content).unwrap();
    let output = node(&foreign, "2");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not a hotpot PM file"), "{stderr}");
    assert!(
        std::fs::read(&foreign).unwrap() == content,
        "foreign file was modified"
    );

    // A damaged pool: refused with the damage named, not a byte changed.
    let damaged = spare.path().join("damaged.pm");
    let mut pool = std::fs::read(cluster.pm_file(1)).unwrap();
    pool[20] ^= 0xff;
    std::fs::write(&damaged, &pool).unwrap();
    let output = node(&damaged, "1");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("damaged") && stderr.contains("checksum"),
        "{stderr}"
    );
    assert!(
        std::fs::read(&damaged).unwrap() == pool,
        "damaged file was modified"
    );

    // Another node's pool.
    let output = node(&damaged_copy_of(&cluster, spare.path()), "2");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("belongs to node 1"),
        "{stderr}"
    );

    // The cluster still serves.
    std::fs::write(mount.join("after"), b"still here").unwrap();
    assert_eq!(std::fs::read(mount.join("after")).unwrap(), b"still here");
}

fn damaged_copy_of(cluster: &Cluster, dir: &std::path::Path) -> std::path::PathBuf {
    let copy = dir.join("copy.pm");
    std::fs::copy(cluster.pm_file(1), &copy).unwrap();
    copy
}
