//! `hotpot-bench recovery`: a node lost with its PM file and brought back on a new one. Fills a
//! dataset of `--size` on node 1 (replicas 2, 4 MiB chunks over 3 nodes), deletes node 2's PM
//! file under it (`cluster kill --wipe`), restarts it, and measures how long until it serves
//! again (its rejoin fetches every page it owns from the surviving copies: what an owner
//! promotion would have to move) and until every page has two copies again (the owners'
//! re-replication of what node 2 held for them). Then checks a sample of pages on node 2.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cluster::LocalCluster;

const WINDOW: usize = 64 << 20;

fn stamp(page: u64) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&page.to_le_bytes());
    bytes[8..].copy_from_slice(&(page ^ 0x5eed_5eed).to_le_bytes());
    bytes
}

/// Write a stamp into every page through a mapping, one msync per 64 MiB window.
fn fill(path: &Path, size: usize) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a shared mapping of a file we hold open, of its size.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    let mut result = Ok(());
    for window in (0..size).step_by(WINDOW) {
        let end = (window + WINDOW).min(size);
        for at in (window..end).step_by(4096) {
            // SAFETY: in the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    stamp((at / 4096) as u64).as_ptr(),
                    (base as *mut u8).add(at),
                    16,
                );
            }
        }
        // SAFETY: syncing part of our own mapping.
        let rc = unsafe {
            libc::msync(
                (base as *mut u8).add(window) as *mut libc::c_void,
                end - window,
                libc::MS_SYNC,
            )
        };
        if rc != 0 {
            result = Err(anyhow::anyhow!(
                "msync: {}",
                std::io::Error::last_os_error()
            ));
            break;
        }
        eprint!("\r  filled {} of {} MiB", end >> 20, size >> 20);
    }
    eprintln!();
    // SAFETY: unmapping what we mapped.
    unsafe {
        libc::munmap(base, size);
    }
    result
}

fn min_copies(cluster: &LocalCluster, path: &Path) -> anyhow::Result<u64> {
    let stat: serde_json::Value =
        serde_json::from_str(&cluster.hotpot(&["stat", "--json", &path.to_string_lossy()])?)?;
    Ok(stat["min_copies"].as_u64().unwrap_or(0))
}

pub fn run(hotpot: &Path, size: u64) -> anyhow::Result<()> {
    if !size.is_multiple_of(4 << 20) || size == 0 {
        bail!("--size must be a positive multiple of 4 MiB");
    }
    let pm = format!("{}MiB", (size + size / 2 + (256 << 20)) >> 20);
    println!(
        "3 nodes, PM {pm} each, dataset {} MiB, replicas 2",
        size >> 20
    );
    let cluster = LocalCluster::up_with_pm(hotpot, 3, &pm)?;
    cluster.create("lost", &format!("{}MiB", size >> 20), "mrsw", 2)?;
    let path = cluster.mount(1).join("lost");
    let started = Instant::now();
    fill(&path, size as usize)?;
    let fill_s = started.elapsed().as_secs_f64();
    let dir = cluster.dir().to_string_lossy().to_string();
    cluster.hotpot(&["cluster", "kill", "--wipe", "--node", "2", "--dir", &dir])?;
    let restarted = Instant::now();
    cluster.hotpot(&["cluster", "start-node", "--node", "2", "--dir", &dir])?;
    let serving_s = restarted.elapsed().as_secs_f64();
    // The node reports its rejoin time in its next heartbeats.
    let mut rejoin_ms = 0;
    for _ in 0..50 {
        let status: serde_json::Value =
            serde_json::from_str(&cluster.hotpot(&["status", "--json", "--dir", &dir])?)?;
        let recovery = status["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|node| node["id"] == 2))
            .map(|node| node["usage"]["recovery"].clone())
            .unwrap_or_default();
        if recovery["state"] == "ready" && recovery["rebuilt"] == true {
            rejoin_ms = recovery["rejoin_ms"].as_u64().unwrap_or(0);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // `hotpot stat` reads every node's copy list: polled every 500 ms (it costs CPU too).
    let deadline = Instant::now() + Duration::from_secs(600);
    while min_copies(&cluster, &path)? < 2 {
        if Instant::now() > deadline {
            bail!("pages stayed below two copies for 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let copies_s = restarted.elapsed().as_secs_f64();
    // Node 2 serves the right bytes (a sample: every 61st page).
    let file = std::fs::File::open(cluster.mount(2).join("lost"))?;
    let mut bytes = [0u8; 16];
    for page in (0..size / 4096).step_by(61) {
        file.read_exact_at(&mut bytes, page * 4096)?;
        if bytes != stamp(page) {
            bail!("page {page} wrong on node 2 after its recovery");
        }
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    println!("| step | seconds | per GiB |");
    println!("|---|---|---|");
    println!(
        "| fill (mmap + msync per 64 MiB) | {fill_s:.2} | {:.2} |",
        fill_s / gib
    );
    println!(
        "| lost node restarted until it serves (rejoin {rejoin_ms} ms: owned pages rebuilt) | {serving_s:.2} | {:.2} |",
        serving_s / gib
    );
    println!(
        "| until every page has 2 copies again | {copies_s:.2} | {:.2} |",
        copies_s / gib
    );
    println!("sample of node 2's pages checked: right");
    println!(
        "ratio recovery/GiB {:.2} s (Hotpot paper: <= 2.3 s per GB)",
        copies_s / gib
    );
    Ok(())
}
